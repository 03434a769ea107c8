"""ROSD's and Feedback Distillation's teacher contexts, every variant: the teacher reads exactly the text the
method prescribes, then scores exactly the rollout's tokens at the right positions (checked against a plain full
forward of the teacher model on the unpadded sequence, as the OPSD test does), and ROSD's loss mask starts at the
first error's token (or covers the whole rollout where it must)."""
import contextlib

import pytest
import torch

from pydistill.trainers.fd.feedback import VerifierFeedback, without_attempt_numbers
from pydistill.models import tiny_model
from pydistill.prompts import feedback_teacher_messages, render, rosd_teacher_messages
from pydistill.tasks import derives_answer
from pydistill.trainers.rosd.reflection import StepCheckReflector
from pydistill.trainers import FDTrainer, ROSDTrainer
from pydistill.boundary import read_head
from tests.test_trainer_fd import GroupEngine as FDEngine
from tests.test_trainer_fd import RIGHT, WRONG, SevensTask, fd_config
from tests.test_trainer_rosd import brute_force_t_star, decode, rosd_config, scripted_reply
from tests.trainer_helpers import TASK, GroupEngine

pytestmark = [pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`"),
              pytest.mark.usefixtures("one_thread")]


def assert_scores_the_rollout(teacher_model, batch, hidden, prompts, completions, adapter_off=False):
    """Row by row: the context is prompt + completion, the targets are the completion, and the hidden state the
    trainer hands to the op at completion token t gives the same next-token distribution as a full forward of
    ``teacher_model`` on the unpadded sequence at position len(prompt) - 1 + t."""
    weight = read_head(teacher_model).weight
    for row, (p, c) in enumerate(zip(prompts, completions)):
        length = int(batch.attention_mask[row].sum())
        assert batch.input_ids[row, :length].tolist() == list(p) + list(c)
        assert batch.targets[row, :len(c)].tolist() == list(c)
        assert batch.completion_mask[row].tolist() == [t < len(c) for t in range(batch.completion_mask.shape[1])]
        switch = teacher_model.disable_adapter() if adapter_off else contextlib.nullcontext()
        with torch.no_grad(), switch:
            logits = teacher_model(torch.tensor([list(p) + list(c)])).logits[0]
        want = torch.log_softmax(logits[len(p) - 1:len(p) - 1 + len(c)], -1)
        got = torch.log_softmax(hidden[row, :len(c)] @ weight.t(), -1)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # the distribution at each position is the one that predicts that very rollout token (no off-by-one)
        assert torch.equal(want.gather(1, torch.tensor(list(c)).unsqueeze(1)).squeeze(1),
                           want[torch.arange(len(c)), torch.tensor(list(c))])


# ----- ROSD -----------------------------------------------------------------------------------------------
def rosd_trainer(tmp_path, reply=None, **overrides):
    cfg = rosd_config(tmp_path, micro_batch_size=4, **overrides)
    model, tok = tiny_model(seed=0)
    engine = GroupEngine(tok, TASK.problems(cfg.train_split, n=cfg.train_problems, seed=cfg.seed), reply=reply)
    return ROSDTrainer(cfg, model=model, tokenizer=tok, task=TASK, rollout_engine=engine)


ROSD_VARIANTS = [
    dict(),  # the paper's setting: sibling, explanation, suffix
    dict(privileged="solution"),
    dict(privileged="derived_sibling"),
    dict(explanation=False),
    dict(loss_span="whole"),
    dict(privileged="solution", explanation=False, loss_span="whole"),
    dict(reflector="model"),
    dict(lora_r=4, lora_alpha=8),  # the fixed teacher is the base model with the adapter disabled
]


@pytest.mark.parametrize("overrides", ROSD_VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
                         or "paper")
def test_rosd_teacher_reads_the_prescribed_text_and_scores_the_rollout(tmp_path, overrides):
    problems = TASK.problems("train", n=8, seed=0)
    reply = scripted_reply(problems) if overrides.get("reflector") == "model" else None
    trainer = rosd_trainer(tmp_path, reply=reply, **overrides)
    cfg, tok = trainer.config, trainer.tokenizer
    prepared = trainer.prepare(trainer.train_pool[:4])
    rollouts = trainer.engine.sample([p for p in trainer.engine.calls[0][0]], trainer.sampling)
    group = [p for p in trainer.train_pool[:4] for _ in range(cfg.num_generations)]
    student, teacher, mask = prepared["student"], prepared["teacher"], prepared["mask"]
    teacher_prompts, completions, located = [], [], 0
    for row, ((i, s), reflection) in enumerate(zip(prepared["pairs"], prepared["reflections"])):
        problem, ids, text = group[i], rollouts.completion_ids[i], rollouts.texts[i]
        # the privileged text: a verified-correct rollout of the same group, or the task's reference solution
        assert i // cfg.num_generations == s // cfg.num_generations and TASK.is_correct(group[s], rollouts.texts[s])
        shown = problem.solution if cfg.privileged == "solution" else rollouts.texts[s]
        if cfg.privileged == "derived_sibling":  # a success of the group other than i that shows its arithmetic
            start = i - i % cfg.num_generations
            cyclic = [start + (s - start + k) % cfg.num_generations for k in range(cfg.num_generations)]
            derived = [rollouts.texts[j] for j in cyclic if j != i and TASK.is_correct(problem, rollouts.texts[j])
                       and derives_answer(rollouts.texts[j], problem.answer)]
            shown = derived[0] if derived else problem.solution
        explanation = reflection.explanation if cfg.explanation else None
        prompt = render(tok, rosd_teacher_messages(problem.question, shown, explanation,
                                                   task_solution=shown is problem.solution))
        teacher_prompts.append(tok(prompt, add_special_tokens=False)["input_ids"])
        completions.append(ids)
        shows_review = bool(cfg.explanation and reflection.explanation)
        assert ("A review of an earlier attempt" in prompt) == shows_review
        if reflection.explanation:
            assert (reflection.explanation in prompt) == shows_review
        if reflection.quote is not None and reflection.quote not in shown:  # the attempt's error is never shown
            assert reflection.quote not in prompt
        # the loss mask: from the quote's first token for a located error of an incorrect rollout, else whole
        correct = TASK.is_correct(problem, text)
        found = reflection.quote is not None and not correct and reflection.quote.replace("  ", " ") in text
        if found and cfg.loss_span == "suffix":
            located += 1
            t_star = brute_force_t_star(tok, ids, reflection.quote.replace("  ", " "))
            assert t_star > 0 and decode(tok, ids[t_star:]).lstrip().startswith(reflection.quote.replace("  ", " "))
        else:
            t_star = 0
        assert prepared["t_star"][row] == t_star
        assert mask[row].tolist() == [t_star <= t < len(ids) for t in range(mask.shape[1])]
        assert student.input_ids[row, :int(student.attention_mask[row].sum())].tolist() == \
            list(rollouts.prompt_ids[i]) + list(ids)
    assert located > 0 or cfg.loss_span == "whole"
    assert torch.equal(student.targets, teacher.targets)
    assert torch.equal(student.completion_mask, teacher.completion_mask)
    hidden = trainer.teacher.hidden_states(teacher)
    if trainer.teacher.copy is not None:
        assert_scores_the_rollout(trainer.teacher.copy, teacher, hidden, teacher_prompts, completions)
    else:
        assert_scores_the_rollout(trainer.model, teacher, hidden, teacher_prompts, completions, adapter_off=True)
    if cfg.loss_span == "whole":
        assert torch.equal(mask, student.completion_mask)


def test_rosd_reference_variant_keeps_the_same_rollouts_and_masks(tmp_path):
    """Only the teacher's text changes with ``privileged``: same kept rollouts, same t*."""
    paper = rosd_trainer(tmp_path / "a").prepare(rosd_trainer(tmp_path / "x").train_pool[:4])
    reference = rosd_trainer(tmp_path / "b", privileged="solution")
    out = reference.prepare(reference.train_pool[:4])
    assert out["pairs"] == paper["pairs"] and out["t_star"] == paper["t_star"]
    assert torch.equal(out["mask"], paper["mask"])
    assert not torch.equal(out["teacher"].input_ids, paper["teacher"].input_ids)


# ----- Feedback Distillation ------------------------------------------------------------------------------
def fd_trainer(tmp_path, feedback_source=None, **overrides):
    model, tok = tiny_model(seed=0)
    return FDTrainer(fd_config(tmp_path, **overrides), model=model, tokenizer=tok, task=SevensTask(),
                     rollout_engine=FDEngine(tok), feedback_source=feedback_source)


FD_VARIANTS = [
    dict(),
    dict(include_sibling=True),
    dict(feedback_content="no_attempt_numbers"),
    dict(feedback_content="no_attempt_numbers", include_sibling=True),
    dict(feedback_content="solution"),
    dict(feedback_content="full"),
    dict(feedback="critic"),
    dict(feedback="critic", feedback_content="no_attempt_numbers"),
    dict(teacher="fixed"),
    dict(teacher="live"),
    dict(teacher_frame="previous_attempt", include_sibling=True),
]


def expected_feedback(cfg, problem, attempt):
    if cfg.feedback_content == "solution":
        return f"A correct solution is:\n{problem.solution}"
    if cfg.feedback == "critic":
        text = "Check the product; the total is [answer withheld]."  # FDEngine's critique, answer redacted
        return without_attempt_numbers(text, attempt, problem.question) \
            if cfg.feedback_content == "no_attempt_numbers" else text
    return VerifierFeedback(quote_attempt=cfg.feedback_content == "full", state_answer=cfg.feedback_content ==
                            "corrections")(problem.question, attempt, problem.answer)


@pytest.mark.parametrize("overrides", FD_VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
                         or "paper")
def test_fd_teacher_reads_the_prescribed_text_and_scores_the_rollout(tmp_path, overrides):
    trainer = fd_trainer(tmp_path, **overrides)
    cfg, tok = trainer.config, trainer.tokenizer
    prepared = trainer.prepare(trainer.train_pool[:2])
    groups, teacher = prepared["groups"], prepared["teacher"]
    texts, ids = groups.rollouts.texts, groups.rollouts.completion_ids
    assert texts == [RIGHT, WRONG] * 2
    prompts, informative = [], []
    for i, (problem, text) in enumerate(zip(groups.problems, texts)):
        feedback = expected_feedback(cfg, problem, text)
        assert prepared["feedback"][i] == feedback
        sibling = RIGHT if cfg.include_sibling and text == WRONG else None  # the RIGHT attempt has no other one
        prompt = render(tok, feedback_teacher_messages(problem.question, feedback, sibling, cfg.teacher_frame))
        prompts.append(tok(prompt, add_special_tokens=False)["input_ids"])
        informative.append(bool(feedback) or sibling is not None)
        if cfg.feedback_content != "full" and text == WRONG:
            assert "11" not in prompt  # the wrong result never reaches the teacher
        if cfg.feedback == "verifier" and cfg.feedback_content != "solution":
            # feedback and reward agree: nothing to say exactly on the rollouts the verifier rewards
            assert (feedback is None) == bool(groups.correct[i])
    assert torch.equal(groups.student.targets, teacher.targets)
    assert torch.equal(groups.student.completion_mask, teacher.completion_mask)
    hidden = trainer.teacher.hidden_states(teacher)
    model = trainer.teacher.copy if trainer.teacher.copy is not None else trainer.model
    assert_scores_the_rollout(model, teacher, hidden, prompts, ids)
    # only the rollouts whose teacher context holds feedback or a sibling are distilled, each whole
    rows = torch.tensor(informative).unsqueeze(1)
    assert torch.equal(trainer.trained_mask(prepared), groups.student.completion_mask & rows)


def test_verifier_feedback_without_the_attempts_numbers():
    full, clean = VerifierFeedback(), VerifierFeedback(quote_attempt=False)
    assert full("q", WRONG, "7") == 'The step "5 * 2 = 11" is wrong: 5 * 2 = 10, not 11. The final answer 11 is ' \
                                    'not correct.'
    assert clean("q", WRONG, "7") == 'One step is wrong: it should read "5 * 2 = 10". The final answer is not correct.'
    assert clean("q", RIGHT, "7") is None and full("q", RIGHT, "7") is None
    assert clean("q", "5 + 2 = 7. The answer is 8.", "7") == "The final answer is not correct."
    # the generic redaction keeps the question's numbers and withholds only what the attempt introduced
    assert without_attempt_numbers("Use 12 - 5, not 12 + 5 = 17; 7.5 is off, 17.", "12 + 5 = 17, or 7.5",
                                   "Tom has 12 and gives 5.") == "Use 12 - 5, not 12 + 5 = [...]; [...] is off, [...]."
    assert without_attempt_numbers(None, "1", "2") is None


def test_verifier_corrections_state_every_right_value_and_no_attempt_number():
    corrections = VerifierFeedback(quote_attempt=False, state_answer=True)
    assert corrections("q", WRONG, "7") == ('One step is wrong: it should read "5 * 2 = 10". The final answer is not '
                                            'correct. The final answer should be 7.')
    assert corrections("q", RIGHT, "7") is None
    assert corrections("q", "5 + 2 = 7. The answer is 8.", "7") == ("The final answer is not correct. The final "
                                                                    "answer should be 7.")
    assert corrections("q", "I am not sure.", "7").endswith('"The answer is" and the number. The final answer '
                                                           'should be 7.')


def test_rosd_and_fd_diagnosis_switches_are_validated():
    from pydistill.trainers import FDConfig, ROSDConfig

    for overrides, match in [(dict(privileged="gold"), "privileged must be one of"),
                             (dict(loss_span="prefix"), "loss_span must be one of"),
                             (dict(explanation="yes"), "explanation must be true or false")]:
        with pytest.raises(ValueError, match=match):
            ROSDConfig(**overrides).validate()
    with pytest.raises(ValueError, match="feedback_content must be one of"):
        FDConfig(feedback_content="numbers").validate()

    assert (ROSDConfig().privileged, ROSDConfig().explanation, ROSDConfig().loss_span) == ("sibling", True, "suffix")
    assert FDConfig().feedback_content == "corrections"  # the verifier's right values, never the attempt's numbers


def test_step_check_reflector_hit_rate_on_corrupted_reference_steps():
    """The reflector finds every corrupted result (the measured figure is in benchmarks/reflector_hit_rate.py);
    a wrong operand or operator with consistent arithmetic is outside what a step checker can see."""
    from benchmarks.reflector_hit_rate import measure

    rates = measure(n=40, seed=3, splits=("train", "ood"))
    assert rates["result"]["hit_rate"] == 1.0 and rates["result"]["cases"] > 0
    assert rates["operand"]["hit_rate"] == 0.0 and rates["operator"]["hit_rate"] == 0.0
    reflector = StepCheckReflector(TASK)
    problem = TASK.problems("ood", n=1, seed=0)[0]
    assert reflector.reflect_batch([dict(problem=problem, attempt=problem.solution, answer=problem.answer,
                                         attempt_is_correct=True)])[0].quote is None


def test_teacher_signal_diagnostic_runs_on_scripted_rollouts(monkeypatch):
    """benchmarks.teacher_signal on a tiny model: every context is scored on the same kept rollouts."""
    import pydistill.evaluation as evaluation
    from benchmarks.teacher_signal import CONTEXTS, measure

    model, tok = tiny_model()
    problems = TASK.problems("train", n=2, seed=0)
    engine = GroupEngine(tok, problems, patterns=("RWPW", "WWWW"))

    def scripted(model, tokenizer, prompts, **kwargs):
        out = engine.sample(sorted(set(prompts), key=prompts.index), type("S", (), dict(n=4, max_new_tokens=40))())
        return out.texts, out.completion_ids

    monkeypatch.setattr(evaluation, "generate_completions", scripted)
    result = measure(model, tok, TASK, problems, generations=4)
    assert (result["rollouts"], result["kept_rollouts"], result["kept_correct"]) == (8, 4, 1)
    assert set(result["contexts"]) == set(CONTEXTS)
    for c in result["contexts"].values():
        assert c["forward_kl"] >= 0 and c["jsd"] >= 0 and c["teacher_entropy"] > 0
        assert c["answer_slots"] == 3 and c["discrimination"] is not None
        assert 0 < c["answer_first"] < 1 and 0 < c["student_answer_first"] < 1


def test_teacher_signal_scores_with_the_whole_head(monkeypatch):
    """The diagnostic's eager log-probs are the model's own logits (bias and softcap included, on Gemma-2 with a
    head bias), and every op call it makes gets the head's bias and softcap."""
    import sys

    import torch

    import pydistill.evaluation as evaluation
    from benchmarks.teacher_signal import head_log_probs, hidden_rows, measure
    from pydistill.boundary import read_head
    from tests.test_model_families import _family

    model, tok = _family("gemma2")
    head_layer = model.get_output_embeddings()
    head_layer.bias = torch.nn.Parameter(torch.randn(head_layer.weight.shape[0]))
    prompt, completion = [5, 6, 7], [20, 21, 22]
    hidden = hidden_rows(model, tok, [prompt], [completion])[0]
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([prompt + completion])).logits[0, 2:5].float(), -1)
    torch.testing.assert_close(head_log_probs(read_head(model), hidden), want, rtol=1e-5, atol=1e-5)

    problems = TASK.problems("train", n=2, seed=0)
    engine = GroupEngine(tok, problems, patterns=("RWPW", "WWWW"))

    def scripted(model, tokenizer, prompts, **kwargs):
        out = engine.sample(sorted(set(prompts), key=prompts.index), type("S", (), dict(n=4, max_new_tokens=40))())
        return out.texts, out.completion_ids

    op = sys.modules["pydistill.token_stats"]  # the package (``pydistill.token_stats`` is also the function)
    calls, real = [], op.token_stats
    monkeypatch.setattr(evaluation, "generate_completions", scripted)
    monkeypatch.setattr(op, "token_stats", lambda *args, **kwargs: calls.append(kwargs) or real(*args, **kwargs))
    measure(model, tok, TASK, problems, generations=4, contexts=("opsd_reference",))
    assert calls and all(c.get("bias") is head_layer.bias and c.get("softcap") == 2.0 for c in calls)

"""ROSD on a tiny model: group filters, sibling selection, reflections and t*, teacher contexts, the rows that reach
the fused op, and one full step against an eager float64 computation of the objective (loss and gradients)."""
import copy
import re

import pytest
import torch

from pydistill.cli import build_parser, load_config
from pydistill.models import tiny_model
from pydistill.prompts import render, rosd_teacher_messages, student_messages
from pydistill.trainers.rosd.reflection import (Reflection, StepCheckReflector, find_quote, first_error_token_index,
                                               parse_reflection)
from pydistill.trainers import TRAINERS, ROSDConfig, ROSDTrainer
from pydistill.boundary import read_head
from pydistill.trainers.rollout import SamplingSettings
from pydistill.trainers.rosd import select_siblings
from tests.trainer_helpers import TASK, GroupEngine, count_op_rows, step_gradients

pytestmark = [pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`"),
              pytest.mark.usefixtures("one_thread")]


MIXED_WITH_EMPTY_MICRO_BATCHES = ("RWLP", "WWWW", "RRRR", "LWRW")  # with micro-batches of 1: two are dropped


def rosd_config(tmp_path, **overrides):
    values = dict(model="tiny", lora_r=0, max_steps=1, batch_size=4, micro_batch_size=2, num_generations=4,
                  max_new_tokens=32, eval_problems=0, output_dir=str(tmp_path / "run"), learning_rate=1e-3,
                  warmup_steps=0, progress=False, train_problems=8, max_grad_norm=1e9)
    values.update(overrides)
    return ROSDConfig(**values)


def make_trainer(tmp_path, patterns=GroupEngine.PATTERNS, reply=None, seed=0, **overrides):
    cfg = rosd_config(tmp_path, **overrides)
    model, tok = tiny_model(seed=seed)
    engine = GroupEngine(tok, TASK.problems(cfg.train_split, n=cfg.train_problems, seed=cfg.seed), patterns, reply)
    return ROSDTrainer(cfg, model=model, tokenizer=tok, task=TASK, rollout_engine=engine)


def decode(tok, ids):
    return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def brute_force_t_star(tok, ids, quote):
    """Tokens whose decoded prefix ends at or before the quote's first character, one decode per prefix."""
    start = decode(tok, ids).find(quote)
    assert start >= 0
    return sum(1 for k in range(1, len(ids) + 1) if len(decode(tok, ids[:k])) <= start)


# ----- sibling selection and group filters ------------------------------------------------------------------
def test_select_siblings_rule():
    correct = torch.tensor([[1, 0, 1, 0],   # mixed: wrong ones take the successes in turn
                            [0, 0, 0, 0],   # no success: skipped
                            [1, 1, 1, 1],   # zero spread: dropped
                            [0, 1, 0, 0]], dtype=torch.bool)  # a single success: no sibling, never itself
    sel = select_siblings(correct)
    assert sel.pairs == [(0, 2), (1, 0), (2, 0), (3, 2), (12, 13), (13, None), (14, 13), (15, 13)]
    assert (sel.zero_spread, sel.dropped, sel.skipped) == (2, 2, 1)
    kept = select_siblings(correct, drop_zero_spread=False)
    assert kept.pairs[4:8] == [(8, 9), (9, 10), (10, 11), (11, 8)]  # all-correct group kept: the next success
    assert (kept.dropped, kept.skipped) == (1, 1)
    for i, s in kept.pairs:  # every sibling is a correct rollout of the same group, never the rollout itself
        assert s != i
        assert s is None or (bool(correct.reshape(-1)[s]) and i // 4 == s // 4)
    with pytest.raises(ValueError, match=r"correct must be \[B, G\]"):
        select_siblings(torch.ones(4, dtype=torch.bool))


def test_prepare_filters_groups_and_pairs_correct_siblings(tmp_path):
    trainer = make_trainer(tmp_path, micro_batch_size=4)  # groups: mixed, no success, all correct, mixed
    prepared = trainer.prepare(trainer.train_pool[:4])
    trainer.finalize_batch([prepared])
    texts = trainer.engine.sample([render(trainer.tokenizer, student_messages(p.question))
                                   for p in trainer.train_pool[:4]], trainer.sampling).texts
    kept = [i for i, _ in prepared["pairs"]]
    assert kept == [0, 1, 2, 3, 12, 13, 14, 15]
    problems = [p for p in trainer.train_pool[:4] for _ in range(4)]
    for i, s in prepared["pairs"]:
        assert TASK.is_correct(problems[s], texts[s]) and s // 4 == i // 4
        if TASK.is_correct(problems[i], texts[i]):
            assert s != i  # every kept group here has two successes
    m = prepared["metrics"]
    assert (m["groups_dropped"], m["prompts_skipped"], m["kept_rollouts"]) == (2, 1, 8)
    assert m["zero_spread_fraction"] == 0.5 and m["groups_dropped_fraction"] == 0.5
    assert m["prompts_skipped_fraction"] == 0.25
    assert m["accuracy"] == pytest.approx(8 / 16)
    assert prepared["student"].input_ids.shape[0] == 8  # dropped rollouts are not even forwarded


def test_keeping_all_correct_groups(tmp_path):
    trainer = make_trainer(tmp_path, micro_batch_size=4, drop_zero_spread=False)
    prepared = trainer.prepare(trainer.train_pool[:4])
    assert [i for i, _ in prepared["pairs"]] == [0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15]
    assert prepared["t_star"][4:8] == [0, 0, 0, 0]  # correct rollouts are distilled whole


# ----- reflections, t* and the teacher context --------------------------------------------------------------
def test_step_check_reflections_give_t_star_and_teacher_context(tmp_path):
    trainer = make_trainer(tmp_path, micro_batch_size=4)
    tok = trainer.tokenizer
    prepared = trainer.prepare(trainer.train_pool[:4])
    trainer.finalize_batch([prepared])
    rollouts = trainer.engine.sample([render(tok, student_messages(p.question)) for p in trainer.train_pool[:4]],
                                     trainer.sampling)
    problems = [p for p in trainer.train_pool[:4] for _ in range(4)]
    student, teacher, mask = prepared["student"], prepared["teacher"], prepared["mask"]
    for row, ((i, s), t_star) in enumerate(zip(prepared["pairs"], prepared["t_star"])):
        ids, text = rollouts.completion_ids[i], rollouts.texts[i]
        error = TASK.first_error(problems[i], text)
        if TASK.is_correct(problems[i], text) or error is None:
            assert t_star == 0  # correct rollout, or the step checker found nothing: fall back to 0
        else:
            assert t_star == brute_force_t_star(tok, ids, error.quote) > 0
            assert decode(tok, ids[t_star:]).lstrip().startswith(error.quote)
        want_mask = [t_star <= t < len(ids) for t in range(mask.shape[1])]
        assert mask[row].tolist() == want_mask
        # the teacher context: problem, correct sibling, the reflection's explanation, then the same rollout
        explanation = prepared["reflections"][row].explanation
        prompt = render(tok, rosd_teacher_messages(problems[i].question, rollouts.texts[s], explanation))
        length = int(teacher.attention_mask[row].sum())
        assert teacher.input_ids[row, :length].tolist() == tok(prompt, add_special_tokens=False)["input_ids"] + ids
        assert torch.equal(teacher.targets[row], student.targets[row])
        if error is not None and not TASK.is_correct(problems[i], text):
            assert error.explanation in prompt and error.quote not in prompt.split(rollouts.texts[s])[1]
    m = prepared["metrics"]
    assert m["first_error_located"] == 3 and m["reflection_parse_failures"] == 1  # the "P" rollout
    assert m["first_error_fallback_rate"] == pytest.approx(1 / 4)
    kept_tokens = int(student.completion_mask.sum())
    assert int(mask.sum()) < kept_tokens
    assert m["distilled_token_fraction"] == pytest.approx(int(mask.sum()) / kept_tokens)


def scripted_reply(problems):
    """The model reflector's replies: a whitespace-mangled exact quote, a malformed reply, a quote that is not in
    the attempt, a parsed reply without a quote for a wrong attempt, and NONE for correct attempts."""
    def reply(prompt):
        if "reaches the correct final answer" in prompt:
            return "<first_error>NONE</first_error>\n<explanation>Each step is right.</explanation>"
        attempt = prompt.split("Attempt to review:\n", 1)[1].split("\n\n", 1)[0]
        solution = prompt.split("A correct solution:\n", 1)[1].split("\n\n", 1)[0]
        if not attempt.startswith("First,"):
            return "I think the answer is wrong somewhere."  # malformed: no tags
        if problems[3].question in prompt:
            if solution.startswith("We have"):
                return "<first_error>banana split</first_error><explanation>Wrong sum.</explanation>"
            return "<first_error>NONE</first_error><explanation>Looks fine to me.</explanation>"
        quote = re.search(r"\d+ [-+*/] \d+ = \d+", attempt).group(0)
        return f"<first_error>\"{quote.replace(' ', '  ')}\"</first_error><explanation>Recompute {quote}.</explanation>"
    return reply


def test_model_reflector_parses_counts_and_falls_back(tmp_path):
    problems = TASK.problems("train", n=8, seed=0)
    trainer = make_trainer(tmp_path, micro_batch_size=4, reflector="model", reply=scripted_reply(problems),
                           reflection_temperature=0.7, reflection_max_new_tokens=200)
    tok = trainer.tokenizer
    prepared = trainer.prepare(trainer.train_pool[:4])
    trainer.finalize_batch([prepared])
    prompts, settings = trainer.engine.calls[-1]
    assert len(prompts) == 8 and settings.n == 1 and settings.temperature == 0.7 and settings.max_new_tokens == 200
    assert all(p.startswith("<|im_start|>user\nProblem:") for p in prompts)  # chat-rendered reflection prompts
    m = prepared["metrics"]
    assert (m["reflection_parse_failures"], m["first_error_located"], m["quote_not_found"], m["quote_missing"]) == \
        (1, 1, 1, 1)
    assert m["first_error_fallback_rate"] == pytest.approx(3 / 4)
    t_stars = dict(zip([i for i, _ in prepared["pairs"]], prepared["t_star"]))
    rollouts = trainer.engine.sample([render(tok, student_messages(p.question)) for p in trainer.train_pool[:4]],
                                     trainer.sampling)
    quote = re.search(r"\d+ [-+*/] \d+ = \d+", rollouts.texts[1]).group(0)
    assert t_stars[1] == brute_force_t_star(tok, rollouts.completion_ids[1], quote) > 0  # found despite spacing
    assert t_stars[3] == t_stars[13] == t_stars[15] == 0  # parse failure, quote not found, no quote
    assert prepared["reflections"][0] == Reflection(None, "Each step is right.")
    teacher_text = decode(tok, prepared["teacher"].input_ids[1])
    assert f"Recompute {quote}." in teacher_text


# ----- the loss: rows reaching the op, the eager objective, empty micro-batches -----------------------------
def test_prefix_and_dropped_rows_never_reach_the_op(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, micro_batch_size=4)
    prepared = trainer.prepare(trainer.train_pool[:4])
    rollouts = trainer.engine.sample([render(trainer.tokenizer, student_messages(p.question))
                                      for p in trainer.train_pool[:4]], trainer.sampling)
    want = sum(len(rollouts.completion_ids[i]) - t for (i, _), t in zip(prepared["pairs"], prepared["t_star"]))
    all_tokens = sum(len(c) for c in rollouts.completion_ids)
    assert prepared["tokens"] == want < all_tokens
    rows = count_op_rows(monkeypatch)
    out = trainer.loss(prepared, float(want))
    out.loss.backward()
    assert rows == [want] and out.metrics["tokens"] == want


def eager_rosd_loss(policy, teacher, tok, engine, problems, cfg):
    """The ROSD objective over the whole global batch, written out one sequence at a time in float64."""
    g = cfg.num_generations
    rollouts = engine.sample([render(tok, student_messages(p.question)) for p in problems],
                             SamplingSettings(cfg.max_new_tokens, n=g))
    repeated = [p for p in problems for _ in range(g)]
    correct = [TASK.is_correct(p, t) for p, t in zip(repeated, rollouts.texts)]
    weight, teacher_weight = read_head(policy).weight.double(), read_head(teacher).weight.double()
    total, count, t_stars = 0.0, 0, []
    for group in range(len(problems)):
        members = list(range(group * g, (group + 1) * g))
        successes = [i for i in members if correct[i]]
        if len(successes) in (0, g):
            continue  # no success: skipped; zero spread: dropped
        wrong_seen = 0
        for i in members:
            if correct[i]:
                sibling = ([c for c in successes if c > i] + [c for c in successes if c < i] + [i])[0]
            else:
                sibling, wrong_seen = successes[wrong_seen % len(successes)], wrong_seen + 1
            item = dict(problem=repeated[i], attempt=rollouts.texts[i], answer=repeated[i].answer,
                        attempt_is_correct=correct[i])
            reflection = StepCheckReflector(TASK).reflect_batch([item])[0]
            ids = rollouts.completion_ids[i]
            t_star = 0 if correct[i] or reflection.quote is None else brute_force_t_star(tok, ids, reflection.quote)
            t_stars.append(t_star)
            teacher_prompt = render(tok, rosd_teacher_messages(repeated[i].question, rollouts.texts[sibling],
                                                                reflection.explanation))
            prompt_ids = tok(teacher_prompt, add_special_tokens=False)["input_ids"]
            q_log = eager_log_probs(policy, rollouts.prompt_ids[i], ids, weight)
            with torch.no_grad():
                p_log = eager_log_probs(teacher, prompt_ids, ids, teacher_weight)
            m_log = torch.logsumexp(torch.stack([p_log, q_log]) + torch.log(torch.tensor(0.5)), dim=0)
            jsd = 0.5 * (p_log.exp() * (p_log - m_log)).sum(-1) + 0.5 * (q_log.exp() * (q_log - m_log)).sum(-1)
            total = total + jsd[t_star:].sum()  # importance weight min(exp(0), 2) = 1 on fresh rollouts
            count += len(ids) - t_star
    return total / max(count, 1), t_stars


def eager_log_probs(model, prompt_ids, completion_ids, weight):
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    hidden = model.model(input_ids=ids).last_hidden_state[0]
    start = len(prompt_ids) - 1
    return torch.log_softmax(hidden[start:start + len(completion_ids)].double() @ weight.t(), -1)


@pytest.mark.parametrize("micro_batch_size,patterns", [(2, GroupEngine.PATTERNS),
                                                       (1, MIXED_WITH_EMPTY_MICRO_BATCHES)])
def test_step_matches_eager_objective(tmp_path, micro_batch_size, patterns):
    trainer = make_trainer(tmp_path, micro_batch_size=micro_batch_size, patterns=patterns)
    initial = copy.deepcopy(trainer.model)
    with torch.no_grad():  # the student moves away from its initial weights; the teacher must not follow
        torch.manual_seed(2)
        for p in trainer.model.parameters():
            p.add_(0.3 * torch.randn_like(p) * p.std())
    policy = copy.deepcopy(trainer.model)
    metrics, grads = step_gradients(trainer)
    want_loss, t_stars = eager_rosd_loss(policy, initial, trainer.tokenizer, trainer.engine,
                                         trainer.train_pool[:4], trainer.config)
    assert sum(t > 0 for t in t_stars) >= 2  # the first-error masks matter in this batch
    want_loss.backward()
    assert metrics["loss"] == pytest.approx(float(want_loss.detach()), abs=1e-5)
    for name, p in policy.named_parameters():
        want = p.grad.double()
        scale = float(want.abs().max()) + 1e-8
        torch.testing.assert_close(grads[name].double(), want, rtol=1e-4, atol=2e-5 * scale, msg=name)
    assert any(float(g.abs().max()) > 0 for g in grads.values())
    if micro_batch_size == 2:  # (the core averages metrics over micro-batches, empty ones included)
        assert metrics["importance_weight"] == pytest.approx(1.0)


def test_every_group_dropped_gives_zero_loss_and_gradients(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, patterns=("WWWW", "RRRR"))
    rows = count_op_rows(monkeypatch)
    metrics, grads = step_gradients(trainer)
    assert metrics["loss"] == 0.0 and metrics["trained_tokens"] == 0
    assert all(r == 0 for r in rows)
    assert all(float(g.abs().max()) == 0 for g in grads.values())
    assert metrics["groups_dropped"] == 4 and metrics["prompts_skipped"] == 2


def test_teacher_is_frozen_at_initial_weights(tmp_path):
    trainer = make_trainer(tmp_path, learning_rate=1e-2, max_steps=2)
    initial = copy.deepcopy(trainer.model)
    trainer.training_step()
    teacher = trainer.prepare(trainer.train_pool[:2])["teacher"]
    from pydistill.trainers.contexts import response_hidden_states

    torch.testing.assert_close(trainer.teacher.hidden_states(teacher), response_hidden_states(initial, teacher))
    assert not torch.allclose(response_hidden_states(trainer.model, teacher), response_hidden_states(initial, teacher))
    lora = make_trainer(tmp_path / "lora", lora_r=4, lora_alpha=8)
    assert lora.teacher.copy is None and lora.teacher.uses_adapter_switch  # LoRA: the adapter disabled


def test_training_logs_the_rosd_metrics(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, learning_rate=1e-2)
    summary = trainer.train()
    for key in ("loss", "divergence", "entropy", "reward", "accuracy", "reflection_parse_failures",
                "quote_not_found", "distilled_token_fraction", "groups_dropped", "prompts_skipped",
                "zero_spread_fraction", "importance_weight"):
        assert key in summary, key
    assert summary["loss"] > 0


# ----- config and CLI ---------------------------------------------------------------------------------------
def test_paper_defaults_and_registration():
    cfg = ROSDConfig()
    assert (cfg.num_generations, cfg.divergence, cfg.beta, cfg.importance_clip, cfg.teacher, cfg.learning_rate,
            cfg.warmup_steps, cfg.reflector) == (8, "jsd", 0.5, 2.0, "fixed", 1e-5, 10, "step_check")
    assert TRAINERS["rosd"] == (ROSDConfig, ROSDTrainer)


@pytest.mark.parametrize("overrides,match", [
    (dict(reflector="oracle"), "reflector must be one of"),
    (dict(importance_clip=0.0), "importance_clip must be > 0"),
    (dict(beta=1.5), r"beta must be in \[0, 1\]"),
    (dict(divergence="tvd"), "divergence must be one of"),
    (dict(reflection_temperature=0.0), "reflection_temperature must be > 0"),
    (dict(reflection_max_new_tokens=0), "reflection_max_new_tokens must be a positive integer"),
    (dict(num_generations=0), r"group size \(num_generations\)"),
    (dict(support_topk=0), "support_topk must be a positive integer or None"),
])
def test_bad_config_fails_fast(overrides, match):
    with pytest.raises(ValueError, match=match):
        ROSDConfig(**overrides).validate()


def test_cli_parses_rosd_flags():
    args = build_parser().parse_args(["train", "rosd", "--reflector", "model", "--reflection-temperature", "0.3",
                                      "--importance-clip", "none", "--num-generations", "4",
                                      "--drop-zero-spread", "false", "--beta", "0.25"])
    assert args.method == "rosd"
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "method", "config")}
    cfg = load_config(ROSDConfig, None, overrides)
    assert (cfg.reflector, cfg.reflection_temperature, cfg.importance_clip, cfg.num_generations,
            cfg.drop_zero_spread, cfg.beta) == ("model", 0.3, None, 4, False, 0.25)


# ----- quote mapping and parsing cases not in tests/test_reflection.py --------------------------------------
@pytest.fixture(scope="module")
def tok():
    return tiny_model()[1]


@pytest.mark.parametrize("text,quote,start", [
    ("Café: 3 × 4 = 13\nso  5 +\n 5 = 11, then 5 +  5 = 11.", "5 + 5 = 11", 21),  # whitespace fallback, first hit
    ("ééé 12 + 1 = 14", "12 + 1 = 14", 4),  # multi-byte characters before the quote: characters, not bytes
    ("12 + 1 = 14 and 12 + 1 = 14", "12 + 1 = 14", 0),  # repeated at the very start
    ("The answer is 7.", "7.", 14),  # at the end, before the EOS token
])
def test_quote_to_token_on_rollout_ids(tok, text, quote, start):
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # as rollouts end
    assert find_quote(decode(tok, ids), quote) == start
    t_star = first_error_token_index(tok, ids, quote)
    want = sum(1 for k in range(1, len(ids) + 1) if len(decode(tok, ids[:k])) <= start)
    assert t_star == want
    assert len(decode(tok, ids[:t_star])) <= start < len(decode(tok, ids[:t_star + 1]))


def test_quote_not_found_and_empty(tok):
    ids = tok("3 + 4 = 8. The answer is 8.", add_special_tokens=False)["input_ids"]
    assert first_error_token_index(tok, ids, "3 + 4 = 9") is None
    assert first_error_token_index(tok, ids, "   ") is None
    assert first_error_token_index(tok, ids, "") is None


@pytest.mark.parametrize("reply,expected", [
    ("<FIRST_ERROR>3 + 4 = 8</FIRST_ERROR><Explanation>3 + 4 is 7.</Explanation>",
     Reflection("3 + 4 = 8", "3 + 4 is 7.")),  # tags in any case
    ("<explanation>3 + 4 is 7.</explanation><first_error>“3 + 4 = 8”</first_error>",
     Reflection("3 + 4 = 8", "3 + 4 is 7.")),  # order swapped, typographic quotes stripped
    ("<first_error></first_error><explanation>No mistake.</explanation>", Reflection(None, "No mistake.")),
    ("<explanation>3 + 4 is 7.</explanation>", Reflection(None, "", parsed=False)),  # no first_error tag
    ("<first_error>3 + 4 = 8</first_error><explanation>3 + 4 is 7.", Reflection(None, "", parsed=False)),
    ("<first_error>3 + 4 = 8</first_error></explanation>x<explanation>", Reflection(None, "", parsed=False)),
])
def test_parse_reflection_malformed_and_variants(reply, expected):
    assert parse_reflection(reply) == expected


def test_a_reflector_must_answer_every_rollout(tmp_path):
    class Silent:
        def reflect_batch(self, items):
            return []

    cfg = rosd_config(tmp_path)
    model, tok = tiny_model()
    trainer = ROSDTrainer(cfg, model=model, tokenizer=tok, task=TASK, reflector=Silent(),
                          rollout_engine=GroupEngine(tok, TASK.problems("train", n=8, seed=0)))
    with pytest.raises(ValueError, match="the reflector returned 0 reflections for 4 rollouts"):
        trainer.prepare(trainer.train_pool[:2])


def test_a_step_without_any_distilled_token_leaves_the_weights_alone(tmp_path):
    """Regression: a step in which every group is dropped used to move every weight along AdamW's momentum (the
    recorded 8,000-token ROSD run had 4 such steps out of 13)."""
    trainer = make_trainer(tmp_path, patterns=("RWLP",), max_steps=3)
    first = trainer.training_step()  # a real step: the optimizer's moments are nonzero now
    assert first["trained_tokens"] > 0
    trainer.engine.patterns = ("WWWW", "RRRR")  # every group dropped from here on
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    metrics = trainer.training_step()
    assert metrics["trained_tokens"] == 0 and metrics["groups_dropped"] == 4
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, before[name]), name


# ----- what the teacher is shown ----------------------------------------------------------------------------
def test_derives_answer_needs_checked_arithmetic_that_computes_the_answer():
    from pydistill.tasks import derives_answer

    assert derives_answer("3 * 4 = 12\nThe answer is 12.", "12")
    assert derives_answer("5 + 2 = 7, then 7 * 2 = 14. The answer is 14.", "14")
    assert not derives_answer("Max has 12 books.\nThe answer is 12.", "12")  # right by its last number only
    assert not derives_answer("3 * 4 = 13, 13 - 1 = 12. The answer is 12.", "12")  # a wrong step
    assert not derives_answer("3 * 4 = 12. The answer is 12.", "13")
    assert not derives_answer(None, "12")


def test_derived_sibling_is_a_checked_derivation_else_the_task_solution():
    import types

    fake = types.SimpleNamespace(config=types.SimpleNamespace(privileged="derived_sibling", num_generations=4))
    problem = types.SimpleNamespace(answer="12", solution="REFERENCE")
    texts = ["The answer is 12.", "3 * 4 = 12. The answer is 12.", "3 * 4 = 13", "2 * 6 = 12",  # group 0
             "The answer is 12.", "12", "1 + 1 = 3", "The answer is 12!"]  # group 1: lucky guesses only
    correct = torch.tensor([True, True, False, True, True, True, False, True])

    def shown(i, s):
        return ROSDTrainer.privileged_text(fake, problem, i, s, texts, correct)

    assert shown(2, 0) == texts[1]  # the assigned sibling guesses: the next success that derives the answer
    assert shown(2, 3) == texts[3]  # an assigned sibling that derives is kept
    assert shown(1, 1) == texts[3]  # never the rollout itself
    assert shown(3, 1) == texts[1]
    assert shown(6, 4) == "REFERENCE"  # no success of the group derives the answer
    fake.config.privileged = "sibling"
    assert shown(2, 0) == texts[0]
    fake.config.privileged = "solution"
    assert shown(2, 3) == "REFERENCE"
    problem.solution = None  # a task without worked solutions keeps the paper's sibling
    fake.config.privileged = "derived_sibling"
    assert shown(6, 4) == texts[4]


def test_step_check_explanations_never_state_the_final_answer():
    problem = TASK.problems("train", n=1, seed=0)[0]
    items = [dict(problem=problem, attempt=f"The answer is {problem.answer}.", answer=problem.answer,
                  attempt_is_correct=True),
             dict(problem=problem, attempt="The answer is 100003.", answer=problem.answer, attempt_is_correct=False)]
    for reflection in StepCheckReflector(TASK).reflect_batch(items):
        assert problem.answer not in reflection.explanation


def test_support_topk_reaches_the_loss(tmp_path, monkeypatch):
    """support_topk (the original code's student top-k + tail) reaches the op and changes the objective."""
    import pydistill.trainers.rosd.trainer as rosd_trainer

    trainer = make_trainer(tmp_path, micro_batch_size=4)
    prepared = trainer.prepare(trainer.train_pool[:4])
    full = float(trainer.loss(prepared, float(prepared["tokens"])).loss)
    seen = []
    real = rosd_trainer.distillation_loss
    monkeypatch.setattr(rosd_trainer, "distillation_loss", lambda *a, **k: seen.append(k) or real(*a, **k))
    trainer.config.support_topk = 3
    topk = float(trainer.loss(prepared, float(prepared["tokens"])).loss)
    assert seen[-1]["support_topk"] == 3 and seen[-1].get("topk_tail", True) is True
    assert topk != pytest.approx(full, rel=1e-3)

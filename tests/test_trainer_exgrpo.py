"""ExGRPO: stage 0 (EI data through the trainer), the SFT warm-up, dialogue rollouts, the DSU bonus, one
ExGRPO step against an eager float64 computation, resume, config checks and the CLI."""
import copy
import json
import os
import re

import pytest
import torch

from pydistill import cli
from pydistill.models import apply_lora, tiny_model, LoraSettings
from pydistill.prompts import student_messages
from pydistill.tasks import Problem, Task
from pydistill.trainers import ExGRPOConfig, ExGRPOTrainer
from pydistill.trainers.checkpoint import latest_checkpoint
from pydistill.trainers.contexts import build_context_batch, response_hidden_states
from pydistill.trainers.exgrpo import StageReference, ei_data, probe_turn, question_turn
from pydistill.trainers.exgrpo.dialogue import Turn
from pydistill.trainers.rollout import HFRolloutEngine, Rollouts, SamplingSettings

RULES = "counterfactual,decomposition,explanation_challenge,reverse_reasoning"


class ToyTask(Task):
    """Questions "Q<i>: what is i + i?" (answer 2i); ``offset`` shifts i (another question set)."""

    name, splits = "toy", ("train", "test")

    def __init__(self, offset=0, **_):
        self.offset = offset

    def problems(self, split, n=None, seed=0):
        self.check_split(split)
        ids = range(self.offset, self.offset + (n or 4)) if split == "train" else range(50, 50 + (n or 2))
        return [Problem(f"Q{i}: what is {i} + {i}?", f"Step 1: {i} + {i} = {2 * i}.", str(2 * i)) for i in ids]


class ScriptedTeacher:
    """Rationales and probe solutions are right, except: Q2's decomposition probe gets an answer-less solution
    (unanswerable) and, after any reverse_reasoning probe, the teacher answers the question wrongly."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, prompts):
        out = []
        for prompt in prompts:
            if self.fail_after is not None and self.calls >= self.fail_after:
                raise RuntimeError("teacher died")
            self.calls += 1
            if prompt.startswith("First, a related question"):
                qid = int(re.search(r"Now solve this question.\nQuestion: Q(\d+)", prompt).group(1))
                out.append(f"So \\boxed{{{-1 if 'reverse_reasoning' in prompt else 2 * qid}}}")
            elif "Write ONE new question" in prompt:
                qid = int(re.search(r"Question: Q(\d+)", prompt).group(1))
                rule = re.search(r"Rule \((\w+)\)", prompt).group(1)
                out.append(f"P{qid}-{rule}: what is {qid} * 3?")
            elif prompt.startswith("Question: P"):
                qid = int(re.search(r"P(\d+)-", prompt).group(1))
                out.append("no idea" if "decomposition" in prompt and qid == 2 else
                           f"{qid} * 3 = {3 * qid}. The answer is \\boxed{{{3 * qid}}}.")
            else:
                qid = int(re.search(r"Q(\d+)", prompt).group(1))
                out.append(f"{qid} + {qid} = {2 * qid}. The answer is \\boxed{{{2 * qid}}}.")
        return out


def scripted_student(prompts):
    """The base student: solves every probe of Q0, none of Q1, Q2's counterfactual only, Q3's all but one."""
    out = []
    for prompt in prompts:
        qid, rule = re.search(r"P(\d+)-(\w+)", prompt).groups()
        qid = int(qid)
        right = qid == 0 or (qid == 2 and rule == "counterfactual") or (qid == 3 and rule != "decomposition")
        out.append(f"\\boxed{{{3 * qid if right else 999}}}")
    return out


def refuse(prompts):
    raise AssertionError("stage 0 called a generator although the cache is complete")


class DialogueEngine:
    """Scripted multi-turn rollouts from token ids. Probe turns get the right probe answer; the question turn
    is right or wrong by ``script[qid][scenario][j % G]`` for the j-th rollout of that question and scenario
    in the call. Every prompt it receives is recorded."""

    def __init__(self, tokenizer, script, full_turns):
        self.tokenizer, self.script, self.full_turns = tokenizer, script, full_turns
        self.prompts = []

    def sample_ids(self, prompt_ids, settings):
        tok, texts, seen = self.tokenizer, [], {}
        for ids in prompt_ids:
            self.prompts.append(list(ids))
            text = tok.decode(ids)
            user = text.split("<|im_start|>user\n")[-1].split("<|im_end|>")[0]
            probe, question = re.match(r"P(\d+)-", user), re.match(r"Q(\d+):", user)
            if probe:
                i = int(probe.group(1))
                texts.append(f"{i} * 3 = {3 * i}. The answer is {3 * i}.")
            else:
                i = int(question.group(1))
                scenario = "A" if text.count("<|im_start|>user") == self.full_turns else "B"
                j = seen.get((i, scenario), 0)
                seen[(i, scenario)] = j + 1
                pattern = self.script[i][scenario]
                right = pattern[j % len(pattern)]
                texts.append(f"{i} + {i} = {2 * i}. The answer is {2 * i + (0 if right else 1)}.")
        completions = [tok(t, add_special_tokens=False)["input_ids"][:settings.max_new_tokens - 1] + [tok.eos_token_id]
                       for t in texts]
        return Rollouts([tok.decode(p) for p in prompt_ids], [list(p) for p in prompt_ids], completions,
                        [tok.decode(c, skip_special_tokens=True) for c in completions])

    def sample(self, prompts, settings):
        raise AssertionError("ExGRPO must sample dialogue turns from token ids")


SCRIPT = {2: {"A": [1, 1], "B": [0, 0]}, 3: {"A": [1, 0], "B": [1, 1]}}


def config(tmp_path, **overrides):
    values = dict(model="tiny", lora_r=0, max_steps=1, batch_size=2, micro_batch_size=2, max_new_tokens=24,
                  eval_problems=0, output_dir=str(tmp_path / "run"), learning_rate=5e-3, progress=False,
                  train_problems=4, max_grad_norm=1.0, num_generations=2, num_probes=2, partial_probes=1,
                  ei_rules=RULES, min_solved_fraction=0.3, ei_batch_size=4, sft_steps=1, sft_batch_size=4,
                  sft_learning_rate=5e-3, ei_cache=str(tmp_path / "ei.jsonl"))
    values.update(overrides)
    return ExGRPOConfig(**values)


def make_trainer(tmp_path, teacher=None, student=scripted_student, script=SCRIPT, seed=0, **overrides):
    model, tok = tiny_model(seed=seed)
    cfg = config(tmp_path, **overrides)
    return ExGRPOTrainer(cfg, model=model, tokenizer=tok, task=ToyTask(),
                         rollout_engine=DialogueEngine(tok, script, cfg.num_probes + 1),
                         ei_teacher=teacher or ScriptedTeacher(), ei_student=student)


# ----- stage 0 ----------------------------------------------------------------------------------------------
def test_stage0_filters_known_cases_and_builds_the_pool(tmp_path):
    trainer = make_trainer(tmp_path)
    report = trainer.ei_report
    assert (report.questions, report.probes) == (4, 16)
    assert report.removed_unanswerable == 1  # Q2 decomposition
    assert report.removed_inconsistent == 4  # every reverse_reasoning probe
    assert report.removed_too_easy_questions == 1  # Q0: the base student solves all
    assert report.removed_too_hard_questions == 1  # Q1: none
    assert (report.kept_questions, report.kept_probes) == (2, 5)
    saved = json.load(open(os.path.join(trainer.config.output_dir, "ei_filter_report.json")))
    assert saved["removed_inconsistent"] == 4 and saved["filters"] is True
    assert [q.qid for q in trainer.train_pool] == [2, 3]
    assert [p["rule"] for p in trainer.train_pool[0].probes] == ["counterfactual", "explanation_challenge"]
    q3 = trainer.train_pool[1]
    assert q3.problem.answer == "6" and q3.rationale.endswith("\\boxed{6}.")
    assert q3.probes[0] == dict(rule="counterfactual", probe="P3-counterfactual: what is 3 * 3?",
                                probe_solution="3 * 3 = 9. The answer is \\boxed{9}.", probe_answer="9")
    assert len(trainer.sft_examples) == 5


def test_difficulty_filter_asks_the_student_in_its_own_format(tmp_path):
    asked = []

    def student(prompts):
        asked.extend(prompts)
        return scripted_student(prompts)

    make_trainer(tmp_path, student=student)
    assert asked and all(p == probe_turn(p.split("\n")[0]) for p in asked)  # the inference prompt, not the teacher's
    assert not any(p.startswith("Question: ") for p in asked)


def test_stage0_without_filters_keeps_every_probe(tmp_path):
    trainer = make_trainer(tmp_path, student=refuse, ei_filters=False)
    assert (trainer.ei_report.kept_questions, trainer.ei_report.kept_probes) == (4, 16)
    assert trainer.ei_report.removed_inconsistent == 0


def test_stage0_resumes_through_the_trainer(tmp_path):
    with pytest.raises(RuntimeError, match="teacher died"):
        make_trainer(tmp_path, teacher=ScriptedTeacher(fail_after=9), ei_batch_size=1)
    records = [json.loads(line) for line in open(tmp_path / "ei.jsonl")]
    assert sum(r["kind"] != "question" for r in records) == 9  # every finished call survived the crash
    resumed = ScriptedTeacher()
    first = make_trainer(tmp_path, teacher=resumed, ei_batch_size=1)
    total = 4 + 16 + 16 + 15  # rationales, probes, solutions, consistency checks of the 15 gradable probes
    assert resumed.calls == total - 9
    again = make_trainer(tmp_path, teacher=refuse, student=refuse)  # a second construction: no call at all
    assert again.ei_report == first.ei_report
    assert [q.probes for q in again.train_pool] == [q.probes for q in first.train_pool]
    model, tok = tiny_model()
    with pytest.raises(ValueError, match=r"at question 0 \(different question, answer\)"):
        ExGRPOTrainer(config(tmp_path), model=model, tokenizer=tok, task=ToyTask(offset=10), ei_teacher=refuse,
                      ei_student=refuse, rollout_engine=DialogueEngine(tok, SCRIPT, 3))


def test_no_question_left_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="no training question survived the EI filters"):
        make_trainer(tmp_path, student=lambda prompts: ["\\boxed{999}"] * len(prompts), min_solved_fraction=0.5)


# ----- stage 1 ----------------------------------------------------------------------------------------------
def eager_logp(model, ids):
    """float64 log-probabilities of ids[1:] given their prefixes, from the full logits."""
    logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)


def test_sft_step_matches_eager(tmp_path):
    trainer = make_trainer(tmp_path, stage="sft")
    examples = trainer.sft_examples[:3]
    batch = trainer.sft_batch(examples)
    out = trainer.sft_loss(batch, 40.0)
    out.loss.backward()
    reference = copy.deepcopy(trainer.model).double()
    reference.zero_grad()
    total = 0.0
    for row, (probe, solution) in enumerate(examples):
        reply = list(trainer.reply_ids(solution))
        assert batch.targets[row][batch.completion_mask[row]].tolist() == reply  # only the solution is scored
        assert reply[-1] == trainer.tokenizer.eos_token_id
        dialogue = trainer.builder.build([Turn(probe_turn(probe), tuple(reply))])
        start, stop = dialogue.reply_spans[0]
        assert trainer.tokenizer.decode(dialogue.input_ids[:start]).endswith(
            f"{probe}\n{student_messages('')[0]['content'].strip()}<|im_end|>\n<|im_start|>assistant\n")
        total = total - eager_logp(reference, dialogue.input_ids[:stop])[start - 1:].sum()
    (total / 40.0).backward()
    torch.testing.assert_close(out.loss.double(), total.detach() / 40.0, atol=1e-5, rtol=1e-5)
    grads = dict(reference.named_parameters())
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.grad.double(), grads[name].grad, atol=1e-6, rtol=1e-4, msg=name)


def test_both_stages_step_through_the_cores_autocast_and_model_view(tmp_path, monkeypatch):
    """The SFT warm-up and the GRPO stage run their losses inside the core's optimizer step: under the
    accelerator's autocast (bf16 for a full fine-tune on CUDA) and the model view (whole FSDP2 parameters)."""
    import contextlib

    trainer = make_trainer(tmp_path, max_steps=1, sft_steps=1, save_every=0)
    open_contexts, seen = set(), {}

    def tracked(name):
        @contextlib.contextmanager
        def context(*args, **kwargs):
            open_contexts.add(name)
            try:
                yield
            finally:
                open_contexts.discard(name)
        return context

    monkeypatch.setattr(trainer.accelerator, "autocast", tracked("autocast"))
    monkeypatch.setattr(trainer, "root_view", tracked("model view"))
    def recorded(stage, real):
        def loss(*args):
            seen.setdefault(stage, set(open_contexts))  # what is open around the stage's first loss
            return real(*args)
        return loss

    for stage in ("sft_loss", "loss"):
        monkeypatch.setattr(trainer, stage, recorded(stage, getattr(trainer, stage)))
    trainer.train()
    assert seen == {"sft_loss": {"autocast", "model view"}, "loss": {"autocast", "model view"}}


def test_an_sft_step_without_tokens_leaves_the_weights(tmp_path, monkeypatch):
    """The core's empty-step guard covers the warm-up: AdamW's momentum from a previous step must not move the
    weights on a step with no trained token."""
    trainer = make_trainer(tmp_path, stage="sft", sft_steps=2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    first = trainer.sft_training_step()
    assert first["sft/tokens"] > 0 and any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    real = trainer.sft_batch

    def no_trained_token(examples):
        batch = real(examples)
        batch.completion_mask.zero_()
        return batch

    monkeypatch.setattr(trainer, "sft_batch", no_trained_token)
    after_first = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    empty = trainer.sft_training_step()
    assert empty["sft/tokens"] == 0 and empty["sft/loss"] == 0.0
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, after_first[name]), name


# ----- stage 2: dialogues -----------------------------------------------------------------------------------
def test_dialogue_rollouts_turns_prefixes_and_masks(tmp_path):
    trainer = make_trainer(tmp_path)
    items = trainer.train_pool
    prepared = trainer.prepare(items)
    g, dialogues, batch = 2, prepared["dialogues"], prepared["batch"]
    assert prepared["rollout_rows"] == len(dialogues) == 2 * 2 * g
    tok, builder = trainer.tokenizer, trainer.builder
    for q, item in enumerate(items):
        probes = trainer.dialogue_probes(item)
        assert len(probes) == 2 and {p["probe"] for p in probes} <= {p["probe"] for p in item.probes}
        users = [probe_turn(p["probe"]) for p in probes] + [question_turn(item.problem.question)]
        group = dialogues[q * 2 * g:(q + 1) * 2 * g]
        for d in group[:g]:  # scenario A: both probes, then the question
            assert [t.user for t in d] == users
        for d in group[g:]:  # scenario B: the first k' = 1 probe, then the question
            assert [t.user for t in d] == users[:1] + users[-1:]
        assert users[-1] == student_messages(item.problem.question)[0]["content"]  # = inference prompt
    # every turn was sampled from the exact prefix of the final dialogue
    expected_prompts = []
    for turn in range(3):
        for d in dialogues:
            if turn < len(d):
                expected_prompts.append(builder.build(d).input_ids[:builder.build(d).reply_spans[turn][0]])
    assert trainer.engine.prompts == expected_prompts
    teacher_rows = prepared["teacher_dialogues"]
    assert len(teacher_rows) == len(items) and batch.input_ids.shape[0] == len(dialogues) + len(items)
    for row, turns in enumerate(dialogues + teacher_rows):
        tokens = builder.build(turns)
        mask = batch.completion_mask[row]
        # trained: exactly the replies' ids of all turns, nothing of the template or the user turns
        assert batch.targets[row][mask].tolist() == [i for t in turns for i in t.reply_ids]
        assert int(mask.sum()) == sum(tokens.trained)
        completion = int(batch.attention_mask[row].sum()) - int(batch.positions[row, 0]) - 1
        assert completion > int(mask.sum())  # the template between turns is in the row but untrained
        # the hidden state at positions[t] predicts targets[t]: the token right after it in the row
        pos = batch.positions[row][mask]
        assert torch.equal(batch.input_ids[row, pos + 1], batch.targets[row][mask])
        assert batch.input_ids[row, :int(batch.attention_mask[row].sum())].tolist() == tokens.input_ids[
            :tokens.reply_spans[-1][1]]
    # the teacher dialogue of a question: probe solutions, then the rationale
    solutions = [p["probe_solution"] for p in trainer.dialogue_probes(items[1])]
    assert [t.reply_ids for t in teacher_rows[1]] == [trainer.reply_ids(s) for s in solutions + [items[1].rationale]]
    assert prepared["tokens"] == int(batch.completion_mask[:len(dialogues)].sum())


@pytest.mark.parametrize("nu,bonus", [(1.0, [[.5, .5], [0., 0.]]), (0.4, [[.5, .5], [.5, 0.]])])
def test_dsu_bonus_on_the_right_rollouts(tmp_path, nu, bonus):
    # Q2: A right twice, B never (P_full 1 > nu * 0). Q3: A right once, B twice (0.5 > nu * 1 only for nu < .5)
    trainer = make_trainer(tmp_path, dsu_delta=0.5, dsu_nu=nu)
    prepared = trainer.prepare(trainer.train_pool)
    assert prepared["success"].tolist() == [[1, 1, 0, 0], [1, 0, 1, 1]]
    assert prepared["bonus"].tolist() == bonus
    outcome = torch.tensor([[1., 1., 0., 0.], [1., 0., 1., 1.]])
    rewards = outcome + torch.cat([torch.tensor(bonus), torch.zeros(2, 2)], dim=1)
    torch.testing.assert_close(prepared["rewards"], rewards.reshape(-1))
    trainer.finalize_batch([prepared])
    # one group per question: its 2G rollouts, scenarios A and B together
    want = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(prepared["advantages"], want.reshape(-1).float())


def test_exgrpo_step_matches_eager_float64(tmp_path):
    beta, coef = 0.2, 0.5
    trainer = make_trainer(tmp_path, beta=beta, sft_coef=coef, dsu_delta=0.5)
    initial = copy.deepcopy(trainer.model).double()
    trainer.teacher = StageReference(trainer.model)  # what train() does when stage 2 starts
    with torch.no_grad():  # the policy has drifted from its reference, so the KL term is not trivially 0
        torch.manual_seed(5)
        for p in trainer.model.parameters():
            p.add_(0.3 * torch.randn_like(p) * p.std())
    drifted = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    prepared = trainer.prepare(trainer.train_pool)
    trainer.finalize_batch([prepared])
    num_items = float(prepared["tokens"])
    out = trainer.loss(prepared, num_items)
    out.loss.backward()
    for name, p in trainer.model.named_parameters():  # the reference weights were swapped back out
        assert torch.equal(p.detach(), drifted[name]), name

    policy = copy.deepcopy(trainer.model).double()
    policy.zero_grad()
    rewards = torch.tensor([[1.5, 1.5, 0, 0], [1, 0, 1, 1]], dtype=torch.float64)
    advantages = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)).reshape(-1)
    builder, pg, sft = trainer.builder, 0.0, 0.0
    for row, turns in enumerate(prepared["dialogues"]):
        tokens = builder.build(turns)
        stop = tokens.reply_spans[-1][1]
        trained = torch.tensor(tokens.trained[1:stop], dtype=torch.bool)
        logp = eager_logp(policy, tokens.input_ids[:stop])[trained]
        with torch.no_grad():
            ref = eager_logp(initial, tokens.input_ids[:stop])[trained]
        ratio = torch.exp(logp - logp.detach())
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        pg = pg + (-advantages[row] * ratio + beta * kl).sum()
    sft_items = prepared["sft_items"]
    assert sft_items == sum(sum(builder.build(t).trained) for t in prepared["teacher_dialogues"])
    for turns in prepared["teacher_dialogues"]:
        tokens = builder.build(turns)
        stop = tokens.reply_spans[-1][1]
        trained = torch.tensor(tokens.trained[1:stop], dtype=torch.bool)
        sft = sft - eager_logp(policy, tokens.input_ids[:stop])[trained].sum()
    total = pg / num_items + coef * sft / sft_items
    total.backward()
    torch.testing.assert_close(out.loss.double(), total.detach(), atol=1e-5, rtol=1e-5)
    assert out.metrics["kl"] > 1e-4 and out.metrics["sft_nll"] > 0
    grads = dict(policy.named_parameters())
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.grad.double(), grads[name].grad, atol=1e-6, rtol=1e-4, msg=name)


def test_reference_under_lora_is_the_adapter_snapshot():
    model, tok = tiny_model()
    model = apply_lora(model, LoraSettings(r=4, alpha=8))
    batch = build_context_batch([[5, 6, 7]], [[8, 9, 10]], tok.pad_token_id)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # an adapter that changes the function (e.g. after the SFT warm-up)
    reference = StageReference(model)
    assert all("lora_" in n for n in reference.snapshot)  # only the adapter is kept
    before = response_hidden_states(model, batch)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.add_(1.0)
    after = response_hidden_states(model, batch)
    assert not torch.allclose(before, after)
    with torch.no_grad(), reference.weights():
        torch.testing.assert_close(response_hidden_states(model, batch), before)
    torch.testing.assert_close(response_hidden_states(model, batch), after)


def test_both_stages_train_save_and_resume_exactly(tmp_path, monkeypatch):
    straight = make_trainer(tmp_path / "a", max_steps=2, sft_steps=2, save_every=1)
    head = straight.model.get_output_embeddings()

    def refuse_head(*args, **kwargs):
        raise AssertionError("the lm_head was called: a [B, T, V] logits tensor would exist")

    monkeypatch.setattr(head, "forward", refuse_head)
    summary = straight.train()
    monkeypatch.undo()
    for key in ("loss", "kl", "sft_loss", "accuracy_full", "accuracy_partial", "dsu_bonus_questions", "reward"):
        assert key in summary, key
    out = straight.config.output_dir
    assert latest_checkpoint(os.path.join(out, "sft")).endswith("checkpoint-2")
    assert os.path.exists(os.path.join(latest_checkpoint(out), "teacher.safetensors"))  # the reference travels
    sft_log = [json.loads(line) for line in open(os.path.join(out, "sft_metrics.jsonl"))]
    assert [r["step"] for r in sft_log] == [1, 2] and sft_log[0]["sft/loss"] > 0

    first = make_trainer(tmp_path / "b", max_steps=1, sft_steps=2, save_every=1)
    first.train()
    resumed = make_trainer(tmp_path / "b", max_steps=2, sft_steps=2, save_every=1, resume=True, seed=3)
    assert (resumed.step, resumed.sft_step) == (1, 2)
    resumed.train()
    for (n, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), n
    for name, value in straight.teacher.snapshot.items():
        assert torch.equal(value, resumed.teacher.snapshot[name]), name

    # a crash inside stage 1 resumes stage 1 from its own checkpoint
    sft_only = make_trainer(tmp_path / "c", stage="sft", sft_steps=1, save_every=1)
    sft_only.train()
    more = make_trainer(tmp_path / "c", stage="sft", sft_steps=2, save_every=1, resume=True, seed=3)
    assert (more.sft_step, more.sft_position) == (1, 4)
    more.train()
    assert latest_checkpoint(os.path.join(more.config.output_dir, "sft")).endswith("checkpoint-2")
    assert latest_checkpoint(more.config.output_dir) is None  # stage "sft": no stage-2 step


# ----- rollout engine ---------------------------------------------------------------------------------------
def test_sample_ids_uses_the_ids_exactly():
    model, tok = tiny_model()
    engine = HFRolloutEngine(model, tok, batch_size=3)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    settings = SamplingSettings(max_new_tokens=6, top_k=1, n=2)  # top_k = 1: greedy, comparable
    out = engine.sample_ids(prompts, settings)
    assert out.prompt_ids == [p for p in prompts for _ in range(2)]
    for prompt, completion in zip(out.prompt_ids, out.completion_ids):
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, len(prompt):].tolist()
        assert completion == alone[:len(completion)] and len(completion) >= 1
        assert tok.pad_token_id not in completion
    with pytest.raises(ValueError, match="at least one token"):
        engine.sample_ids([[]], settings)


# ----- configuration and CLI --------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,match", [
    (dict(partial_probes=3), r"partial_probes \(k'\) must be an integer in \[0, num_probes=3\)"),
    (dict(num_probes=2, partial_probes=2), r"partial_probes \(k'\)"),
    (dict(partial_probes=-1), r"partial_probes \(k'\)"),
    (dict(num_probes=0), r"num_probes \(k\) must be a positive integer"),
    (dict(dsu_delta=-0.1), "dsu_delta must be a finite number >= 0"),
    (dict(dsu_nu=-1.0), "dsu_nu must be a finite number >= 0"),
    (dict(sft_coef=float("nan")), "sft_coef must be a finite number"),
    (dict(stage="warmup"), "stage must be one of"),
    (dict(stage="sft", sft_steps=0), "stage 'sft' needs sft_steps >= 1"),
    (dict(beta=-0.1), "beta"),
    (dict(ei_rules="counterfactual,nonsense"), "ei_rules must be 'all' or comma-separated names"),
    (dict(min_solved_fraction=1.5), r"min_solved_fraction must be in \[0, 1\]"),
    (dict(teacher="ema"), "teacher must be 'fixed' for ExGRPO"),
    (dict(num_generations=0), r"group size \(num_generations\)"),
])
def test_bad_config_fails_fast(overrides, match):
    with pytest.raises(ValueError, match=match):
        ExGRPOConfig(**overrides).validate()


def test_cli_parses_both_commands_and_runs_ei_generate(tmp_path, monkeypatch, capsys):
    args = cli.build_parser().parse_args(["train", "exgrpo", "--num-probes", "4", "--partial-probes", "2",
                                          "--dsu-delta", "0.5", "--dsu-nu", "1.2", "--stage", "rl",
                                          "--ei-teacher", "some/model", "--ei-filters", "false"])
    overrides = {k: v for k, v in vars(args).items() if k in ExGRPOConfig.__dataclass_fields__}
    cfg = cli.load_config(ExGRPOConfig, None, overrides)
    assert (cfg.num_probes, cfg.partial_probes, cfg.dsu_delta, cfg.dsu_nu, cfg.stage, cfg.ei_teacher,
            cfg.ei_filters) == (4, 2, 0.5, 1.2, "rl", "some/model", False)
    assert cli.main(["train", "exgrpo", "--partial-probes", "3"]) == 2  # k' >= k refused before any loading
    assert "partial_probes" in capsys.readouterr().err

    monkeypatch.setitem(__import__("pydistill.tasks", fromlist=["TASKS"]).TASKS, "toy", ToyTask)
    made = []

    def fake_generator(name, **options):
        made.append((name, options))
        return ScriptedTeacher() if name == "T" else scripted_student

    monkeypatch.setattr(ei_data, "text_generator", fake_generator)
    cache = str(tmp_path / "cli.jsonl")
    argv = ["ei", "generate", "--task", "toy", "--n", "4", "--teacher", "T", "--student", "S", "--cache", cache,
            "--rules", RULES, "--min-solved-fraction", "0.3", "--max-new-tokens", "32"]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["removed_inconsistent"], report["removed_too_easy_questions"], report["kept_probes"]) == (4, 1, 5)
    assert [m[0] for m in made] == ["T", "S"] and made[0][1]["max_new_tokens"] == 32
    assert cli.main(argv[:-4] + ["--filters", "false"]) == 0  # rerun from the cache, no filters
    assert json.loads(capsys.readouterr().out)["kept_probes"] == 16


def test_end_to_end_with_real_generation_under_lora(tmp_path):
    """No scripted parts: the student model is the EI teacher and base student (greedy, chat template), every
    dialogue turn is sampled by HFRolloutEngine.sample_ids, LoRA holds the trainable weights."""
    from tests.trainer_helpers import TASK

    model, tok = tiny_model()
    cfg = config(tmp_path, task="arithmetic", train_problems=2, ei_rules="counterfactual,analogy", ei_filters=False,
                 ei_max_new_tokens=6, max_new_tokens=6, lora_r=4, lora_alpha=8, beta=0.1, eval_problems=2,
                 eval_max_new_tokens=6)
    trainer = ExGRPOTrainer(cfg, model=model, tokenizer=tok, task=TASK)
    assert isinstance(trainer.engine, HFRolloutEngine) and trainer.engine.batch_size == 2 * 2 * 2
    assert trainer.ei_report.kept_probes == 4
    adapter = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    summary = trainer.train()
    assert "eval/accuracy" in summary and torch.isfinite(torch.tensor(summary["loss"]))
    # the reference is the adapter after the SFT warm-up, not the initial (zero-effect) adapter
    snapshot = trainer.teacher.snapshot
    assert set(snapshot) == set(adapter)
    assert any(not torch.equal(snapshot[n], adapter[n]) for n in adapter)
    for n, p in trainer.model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p.detach(), snapshot[n]), n  # stage 2 moved on from its reference


@pytest.mark.slow
def test_real_model_smoke(tmp_path):
    """The embedded SmolLM2-135M-Instruct as student and EI teacher, a few questions, both stages."""
    cfg = config(tmp_path, model="SmolLM2-135M-Instruct", task="arithmetic", train_problems=2,
                 ei_rules="counterfactual,decomposition", ei_filters=False, ei_max_new_tokens=48,
                 max_new_tokens=32, lora_r=8, lora_alpha=16, eval_problems=4, eval_max_new_tokens=32,
                 batch_size=1, micro_batch_size=1, learning_rate=1e-4, sft_learning_rate=1e-4)
    trainer = ExGRPOTrainer(cfg)
    summary = trainer.train()
    assert torch.isfinite(torch.tensor(summary["loss"])) and "eval/accuracy" in summary

"""Feedback Distillation: feedback sources through the trainer, the EMA teacher, the loss and the GRPO blend
against separate / eager computations, FD -> GRPO, evaluation pass@k, diversity and bad configs."""
import copy
import json
import math
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import pydistill.boundary as boundary
import pydistill.evaluation as evaluation_module
import pydistill.models as models_module
from pydistill import cli
from pydistill.diversity import distinct_answers, distinct_ngram_ratio, group_diversity, words
from pydistill.trainers.fd.feedback import FeedbackUnavailable
from pydistill.models import tiny_model
from pydistill.plotting import plot_comparison
from pydistill.prompts import feedback_teacher_messages, student_messages
from pydistill.tasks import Task
from pydistill.tasks.base import Problem
from pydistill.trainers import TRAINERS, FDConfig, FDTrainer, GRPOLoopConfig, GRPOLoopTrainer
from pydistill.trainers.checkpoint import latest_checkpoint
from pydistill.trainers.contexts import response_hidden_states
from pydistill.trainers.rollout import HFRolloutEngine, Rollouts
from tests.helpers import count_head_reads

RIGHT = "3 + 4 = 7. The answer is 7."
WRONG = "5 * 2 = 11. The answer is 11."


class SevensTask(Task):
    """Problems whose answer is always 7, so RIGHT is correct and WRONG is wrong (with a wrong step)."""

    name, splits = "sevens", ("train", "test")

    def problems(self, split, n=None, seed=0):
        self.check_split(split)
        pairs = [(3, 4), (2, 5), (1, 6), (4, 3), (5, 2), (6, 1), (0, 7), (7, 0)]
        out = [Problem(f"Tom has {a} apples and buys {b} more. How many now?", f"{a} + {b} = 7", "7")
               for a, b in pairs]
        return out[:n] if n else out


class GroupEngine:
    """Deterministic rollouts: completion k of every group is ``texts[k % len(texts)]``; prompts that ask for a
    critique get ``critique`` (and are recorded with their sampling settings)."""

    def __init__(self, tokenizer, texts=(RIGHT, WRONG), critique="Check the product; the total is 7."):
        self.tokenizer, self.texts, self.critique = tokenizer, texts, critique
        self.critic_calls = []

    def sample(self, prompts, settings):
        tok = self.tokenizer
        repeated = [p for p in prompts for _ in range(settings.n)]
        if any("careful teacher" in p for p in prompts):
            self.critic_calls.append((list(prompts), settings))
            texts = [self.critique] * len(repeated)
        else:
            texts = [self.texts[k % len(self.texts)] for _ in prompts for k in range(settings.n)]
        ids = [tok(t, add_special_tokens=False)["input_ids"][:settings.max_new_tokens] + [tok.eos_token_id]
               for t in texts]
        return Rollouts(repeated, [tok(p, add_special_tokens=False)["input_ids"] for p in repeated], ids,
                        [tok.decode(i, skip_special_tokens=True) for i in ids])


def fd_config(tmp_path, **overrides):
    values = dict(model="tiny", task="sevens", lora_r=0, max_steps=1, batch_size=2, micro_batch_size=1,
                  num_generations=2, max_new_tokens=16, eval_problems=0, eval_samples=0, learning_rate=5e-3,
                  output_dir=str(tmp_path / "fd"), progress=False, train_problems=8, max_grad_norm=1.0)
    values.update(overrides)
    return FDConfig(**values)


def make_trainer(tmp_path, seed=0, engine=None, feedback_source=None, **overrides):
    model, tok = tiny_model(seed=seed)
    return FDTrainer(fd_config(tmp_path, **overrides), model=model, tokenizer=tok, task=SevensTask(),
                     rollout_engine=engine or GroupEngine(tok), feedback_source=feedback_source)


def decoded_rows(trainer, batch):
    return [trainer.tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(batch.input_ids, batch.attention_mask)]


# ----- feedback sources through the trainer ---------------------------------------------------------------
def test_verifier_feedback_builds_the_teacher_context(tmp_path):
    trainer = make_trainer(tmp_path, include_sibling=True)
    prepared = trainer.prepare(trainer.train_pool[:1])
    answer = trainer.train_pool[0].answer
    assert prepared["feedback"] == [None,  # the default: right values only, nothing on a right attempt
                                    'One step is wrong: it should read "5 * 2 = 10". The final answer is not '
                                    f"correct. The final answer should be {answer}."]
    student, teacher = prepared["groups"].student, prepared["teacher"]
    # the teacher scores the very same rollout tokens
    assert torch.equal(student.targets, teacher.targets)
    assert torch.equal(student.completion_mask, teacher.completion_mask)
    right, wrong = decoded_rows(trainer, teacher)
    assert "Notes on this problem" not in right and "previous attempt" not in right
    context = wrong.split("<|im_start|>assistant")[0]  # what the teacher reads before the rollout
    assert '"5 * 2 = 10"' in context and "11" not in context
    assert f"Here is a correct solution:\n{RIGHT}" in wrong  # the sibling of the wrong attempt
    assert "Here is a correct solution:" not in right  # the correct attempt has no other correct sibling
    assert right.endswith(RIGHT + "<|im_end|>") and wrong.endswith(WRONG + "<|im_end|>")
    assert prepared["sibling_share"] == 0.5


def test_critic_feedback_is_the_student_at_low_temperature(tmp_path):
    engine = GroupEngine(tiny_model()[1])
    trainer = make_trainer(tmp_path, engine=engine, feedback="critic", critic_temperature=0.2,
                           critic_max_new_tokens=64)
    prepared = trainer.prepare(trainer.train_pool[:1])
    (prompts, settings), = engine.critic_calls  # one batched call for the whole micro-batch
    assert len(prompts) == 2 and settings.temperature == 0.2 and settings.max_new_tokens == 64 and settings.n == 1
    assert prompts[0].startswith("<|im_start|>user\n") and WRONG in prompts[1] and "Do not state" in prompts[1]
    # the critic's leak of the final answer is redacted before the teacher sees it
    assert prepared["feedback"] == ["Check the product; the total is [answer withheld]."] * 2
    assert all("the total is [answer withheld]" in row for row in decoded_rows(trainer, prepared["teacher"]))


def test_critic_can_be_a_second_model(tmp_path, monkeypatch):
    critic, critic_tok = tiny_model(seed=5)
    loaded = []
    monkeypatch.setattr(models_module, "load_model", lambda name, **kw: loaded.append(name) or (critic, critic_tok))
    trainer = make_trainer(tmp_path, feedback="critic", critic_model="my-critic", critic_max_new_tokens=3)
    assert loaded == ["my-critic"]
    engines = [c.cell_contents for c in trainer.feedback_source.generate.__closure__
               if isinstance(c.cell_contents, HFRolloutEngine)]
    assert len(engines) == 1 and engines[0].model is critic and engines[0] is not trainer.engine
    replies = trainer.feedback_source.generate(["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"])
    assert len(replies) == 1 and isinstance(replies[0], str)


def _fake_lean(folder, body):
    folder.mkdir(exist_ok=True)
    script = folder / "lean"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_lean_feedback_through_the_trainer(tmp_path):
    fake = _fake_lean(tmp_path / "bin", """
        import sys
        path = sys.argv[1]
        body = open(path).read()
        if "11" in body:
            print(f"{path}:2:4: error: unsolved goals\\n  x : Nat\\n  ⊢ x = 7")
            sys.exit(1)
    """)
    trainer = make_trainer(tmp_path, feedback="lean", lean_command=fake, lean_header="import Mathlib",
                           lean_timeout=20)
    metrics = trainer.training_step()
    prepared = trainer.prepare(trainer.train_pool[:1])
    assert prepared["feedback"][0] == "The proof compiles without errors."
    assert prepared["feedback"][1] == "The Lean compiler rejects the proof:\nLine 1, column 4: unsolved goals\n" \
                                      "  x : Nat\n  ⊢ x = 7"
    assert "Line 1, column 4: unsolved goals" in decoded_rows(trainer, prepared["teacher"])[1]
    assert metrics["feedback/given"] == 4 and metrics["feedback/failures"] == 0


def test_missing_lean_binary_fails_at_start_up(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the feedback source was checked")

    monkeypatch.setattr(models_module, "load_model", no_model)
    with pytest.raises(FeedbackUnavailable, match="neither `lean` nor `lake` is on PATH"):
        FDTrainer(fd_config(tmp_path, feedback="lean"))
    with pytest.raises(FeedbackUnavailable, match="was not found"):
        FDTrainer(fd_config(tmp_path, feedback="lean", lean_command="/no/such/lake env lean"))


def test_feedback_failures_and_timeouts_are_counted_not_raised(tmp_path):
    calls = []

    def flaky(prompt, attempt, answer):
        calls.append(attempt)
        if len(calls) % 4 == 1:
            raise RuntimeError("critic server down")
        if len(calls) % 4 == 2:
            raise subprocess.TimeoutExpired("lean", 1.0)
        return "" if len(calls) % 4 == 3 else "Recheck the last step."

    trainer = make_trainer(tmp_path, feedback_source=flaky, max_steps=2)
    summary = trainer.train()  # two steps, eight attempts: never raises
    assert trainer.step == 2 and math.isfinite(summary["loss"])
    assert (summary["feedback/failures"], summary["feedback/timeouts"], summary["feedback/empty"],
            summary["feedback/given"]) == (1, 1, 1, 1)
    assert summary["feedback/given_share"] == 0.25
    # attempts without feedback fall back to the teacher context without feedback: the student prompt itself
    prepared = trainer.prepare(trainer.train_pool[:1])
    assert prepared["feedback"] == [None, None]
    assert torch.equal(prepared["teacher"].input_ids, prepared["groups"].student.input_ids)
    assert feedback_teacher_messages("Q", None) == student_messages("Q")
    assert feedback_teacher_messages("Q", None, frame="notes") == student_messages("Q")
    notes = feedback_teacher_messages("Q", "FB", "SIB", frame="notes")[0]["content"]
    assert "FB" in notes and "SIB" in notes and "attempt" not in notes and "previous" not in notes
    with pytest.raises(ValueError, match="frame must be one of"):
        feedback_teacher_messages("Q", "FB", frame="hint")


# ----- the EMA teacher, the loss, the blend ------------------------------------------------------------
def test_ema_teacher_update_is_exact(tmp_path):
    trainer = make_trainer(tmp_path, ema_rate=0.25, learning_rate=1e-2)
    assert trainer.config.teacher == "ema" and FDConfig.teacher == "ema"
    before = {n: p.detach().clone() for n, p in trainer.teacher.copy.named_parameters()}
    trainer.training_step()
    student = dict(trainer.model.named_parameters())
    moved = 0
    for name, p in trainer.teacher.copy.named_parameters():
        torch.testing.assert_close(p, 0.75 * before[name] + 0.25 * student[name].detach(), rtol=0, atol=1e-7)
        moved += not torch.equal(student[name], before[name])
    assert moved > 0  # the student did move, so the check is not vacuous


@pytest.mark.parametrize("teacher", ["fixed", "live"])
def test_fixed_and_live_teachers(tmp_path, teacher):
    # (a source with nothing to say gives no loss at all: only rollouts with feedback are distilled)
    trainer = make_trainer(tmp_path, teacher=teacher, feedback_source=lambda *args: "Count again.")
    assert (trainer.teacher.copy is None) == (teacher == "live")
    initial = copy.deepcopy(trainer.model)
    with torch.no_grad():  # move the student: a fixed teacher stays at the initial weights, a live one follows
        torch.manual_seed(2)
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = trainer.prepare(trainer.train_pool[:1])["teacher"]
    want = response_hidden_states(trainer.model if teacher == "live" else initial, batch)
    torch.testing.assert_close(trainer.teacher.hidden_states(batch), want)


def _grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def test_blend_gradient_is_the_weighted_sum_of_fd_and_grpo(tmp_path):
    w = 0.3
    # feedback on every rollout: pure FD then distils every rollout too, as the blend's one mask does
    trainer = make_trainer(tmp_path, distillation_weight=w, feedback_source=lambda *args: "Check each step.")
    prepared = [trainer.prepare(trainer.train_pool[:1])]
    trainer.finalize_batch(prepared)
    batch = prepared[0]
    assert batch["advantages"].abs().min() > 0  # one right and one wrong rollout: both terms are live
    num = float(batch["tokens"])

    def grads_of(loss_fn):
        trainer.model.zero_grad(set_to_none=True)
        out = loss_fn(batch, num)
        out.loss.backward()
        return out, _grads(trainer.model)

    blend, g_blend = grads_of(trainer.loss)
    trainer.config.distillation_weight = 1.0
    fd, g_fd = grads_of(trainer.loss)  # distillation_loss alone
    grpo, g_grpo = grads_of(lambda b, n: GRPOLoopTrainer.loss(trainer, b, n))  # grpo_loss alone, same mask
    torch.testing.assert_close(blend.loss, w * fd.loss + (1 - w) * grpo.loss, rtol=1e-5, atol=1e-7)
    assert blend.metrics["distillation_loss"] == pytest.approx(float(fd.loss.detach()), rel=1e-5)
    assert blend.metrics["policy_loss"] == pytest.approx(float(grpo.loss.detach()), rel=1e-5)
    assert any(g.abs().sum() > 0 for g in g_grpo.values()) and any(g.abs().sum() > 0 for g in g_fd.values())
    for name in g_blend:
        torch.testing.assert_close(g_blend[name], w * g_fd[name] + (1 - w) * g_grpo[name], rtol=1e-4, atol=1e-7)


def _eager_rows(model, batch, temperature=1.0):
    """Float64 log-softmax of logits / temperature at each completion position, row by row on the unpadded
    sequence."""
    rows = []
    for ids, attn, positions, mask in zip(batch.input_ids, batch.attention_mask, batch.positions,
                                          batch.completion_mask):
        seq = ids[attn.bool()].unsqueeze(0)
        logits = model(seq).logits[0].double() / temperature
        rows.append(torch.log_softmax(logits[positions[mask]], -1))
    return rows


@pytest.mark.parametrize("divergence,importance_clip,teacher_temperature", [
    ("forward_kl", None, 1.0), ("reverse_kl", None, 1.0), ("jsd", None, 1.0), ("forward_kl", 1.05, 1.0),
    ("reverse_kl", None, 0.6), ("jsd", None, 1.3)])
def test_fd_step_matches_an_eager_computation(tmp_path, divergence, importance_clip, teacher_temperature):
    # sampled at 0.7, matched at 1: the importance ratio pi(y) / q_0.7(y) is not 1
    extra = dict(temperature=0.7, loss_temperature=1.0) if importance_clip else {}
    trainer = make_trainer(tmp_path, divergence=divergence, jsd_beta=0.3, importance_clip=importance_clip,
                           teacher_temperature=teacher_temperature, **extra)
    with torch.no_grad():  # let the EMA teacher differ from the student too
        torch.manual_seed(1)
        for p in trainer.teacher.copy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prepared = [trainer.prepare(problems) for problems in ([trainer.train_pool[0]], [trainer.train_pool[1]])]
    trainer.finalize_batch(prepared)
    num = float(sum(p["tokens"] for p in prepared))
    trainer.model.zero_grad(set_to_none=True)
    total = 0.0
    for batch in prepared:
        out = trainer.loss(batch, num)
        out.loss.backward()
        total += float(out.loss.detach())
    got = _grads(trainer.model)

    trainer.model.zero_grad(set_to_none=True)
    eager = torch.zeros((), dtype=torch.float64)
    for batch in prepared:
        student_rows = _eager_rows(trainer.model, batch["groups"].student)
        with torch.no_grad():
            teacher_rows = _eager_rows(trainer.teacher.copy, batch["teacher"], teacher_temperature)
        targets = batch["groups"].student.targets
        for row, (log_q, log_p) in enumerate(zip(student_rows, teacher_rows)):
            if not batch["informative"][row]:  # no feedback, no sibling: no loss
                continue
            p, q = log_p.exp(), log_q.exp()
            if divergence == "forward_kl":
                per_token = (p * (log_p - log_q)).sum(-1)
            elif divergence == "reverse_kl":
                per_token = (q * (log_q - log_p)).sum(-1)
            else:
                m = 0.3 * p + 0.7 * q
                per_token = 0.3 * (p * (log_p - m.log())).sum(-1) + 0.7 * (q * (log_q - m.log())).sum(-1)
            if importance_clip:
                y = targets[row, :len(log_q)]
                log_q_sampling = torch.log_softmax(log_q.detach() / 0.7, -1)  # logits up to a constant
                ratio = (log_q.detach().gather(1, y[:, None]) - log_q_sampling.gather(1, y[:, None])).exp()[:, 0]
                assert (ratio != 1).all()
                per_token = per_token * ratio.clamp(max=importance_clip)
            eager = eager + per_token.sum()
    eager = eager / num
    eager.backward()
    assert total == pytest.approx(float(eager.detach()), rel=1e-4, abs=1e-7)
    for name, grad in _grads(trainer.model).items():
        torch.testing.assert_close(got[name], grad.float(), rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("teacher,lora_r", [("fixed", 4), ("ema", 0)])
def test_teacher_temperature_divides_the_teacher_logits_bias_included(tmp_path, teacher, lora_r):
    """A head with a bias, shared with the student (fixed teacher = the adapter disabled) or the EMA copy's."""
    model, tok = tiny_model(seed=0)
    head = model.get_output_embeddings()
    torch.manual_seed(2)
    head.bias = torch.nn.Parameter(torch.randn(head.out_features))
    trainer = FDTrainer(fd_config(tmp_path, teacher=teacher, lora_r=lora_r, lora_alpha=8, divergence="reverse_kl",
                                  teacher_temperature=0.5), model=model, tokenizer=tok, task=SevensTask(),
                        rollout_engine=GroupEngine(tok))
    assert (trainer.teacher.copy is None) == (teacher == "fixed")
    batch = trainer.prepare(trainer.train_pool[:1])
    trainer.finalize_batch([batch])
    got = float(trainer.loss(batch, float(batch["tokens"])).loss)
    with torch.no_grad():
        student_rows = _eager_rows(trainer.model, batch["groups"].student)
        if teacher == "fixed":
            with trainer.model.disable_adapter():
                teacher_rows = _eager_rows(trainer.model, batch["teacher"], 0.5)
        else:
            teacher_rows = _eager_rows(trainer.teacher.copy, batch["teacher"], 0.5)
    eager = sum(float((q.exp() * (q - p)).sum()) for q, p, kept in zip(student_rows, teacher_rows,
                                                                      batch["informative"]) if kept)
    eager = eager / batch["tokens"]
    assert got == pytest.approx(eager, rel=1e-4)


def test_training_step_metrics(tmp_path):
    trainer = make_trainer(tmp_path)
    metrics = trainer.training_step()
    for key in ("entropy", "divergence", "reward", "accuracy", "diversity/distinct_answers",
                "diversity/distinct_2grams", "feedback/given", "feedback/failures", "feedback/timeouts",
                "teacher_prompt_tokens"):
        assert key in metrics, key
    assert metrics["diversity/distinct_answers"] == 2.0 and metrics["accuracy"] == 0.5
    assert metrics["entropy"] > 0 and metrics["feedback/given"] == 2  # the wrong attempts only
    assert metrics["distilled_rollouts_share"] == 0.5


# ----- FD -> GRPO -------------------------------------------------------------------------------------
def test_grpo_starts_from_the_fd_checkpoint(tmp_path):
    fd = make_trainer(tmp_path, max_steps=1, learning_rate=5e-2)
    fd.train()
    weights = load_file(os.path.join(latest_checkpoint(fd.config.output_dir), "weights.safetensors"))
    model, tok = tiny_model(seed=7)  # another init: only the checkpoint can make it equal
    assert not torch.equal(dict(model.named_parameters())["lm_head.weight"], weights["lm_head.weight"])
    grpo = GRPOLoopTrainer(_grpo_config(tmp_path, init_from=fd.config.output_dir), model=model, tokenizer=tok,
                       task=SevensTask(), rollout_engine=GroupEngine(tok))
    for name, p in grpo.model.named_parameters():
        assert torch.equal(p.detach(), weights[name]), name
    grpo.training_step()  # and it trains from there


def _grpo_config(tmp_path, **overrides):
    values = dict(model="tiny", task="sevens", lora_r=0, max_steps=1, batch_size=2, micro_batch_size=1,
                  num_generations=2, max_new_tokens=8, eval_problems=0, output_dir=str(tmp_path / "grpo"),
                  progress=False, train_problems=8)
    values.update(overrides)
    return GRPOLoopConfig(**values)


def test_cli_train_fd_then_grpo_init_from(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(models_module, "load_model", lambda name, **kw: tiny_model(seed=3))
    common = ["--model", "tiny", "--lora-r", "0", "--max-steps", "1", "--batch-size", "2", "--micro-batch-size",
              "1", "--num-generations", "2", "--max-new-tokens", "6", "--eval-problems", "0", "--train-problems",
              "4", "--progress", "false"]
    fd_dir = str(tmp_path / "fd")
    assert cli.main(["train", "fd", *common, "--output-dir", fd_dir, "--learning-rate", "0.05"]) == 0
    assert "loss" in json.loads(capsys.readouterr().out)
    weights = load_file(os.path.join(latest_checkpoint(fd_dir), "weights.safetensors"))
    assert not torch.equal(dict(tiny_model(seed=3)[0].named_parameters())["lm_head.weight"], weights["lm_head.weight"])

    started = []

    class Recording(GRPOLoopTrainer):
        def train(self):
            started.append({n: p.detach().clone() for n, p in self.model.named_parameters()})
            return {}

    monkeypatch.setitem(TRAINERS, "grpo", (GRPOLoopConfig, Recording))
    assert cli.main(["train", "grpo", *common, "--output-dir", str(tmp_path / "grpo"), "--init-from", fd_dir]) == 0
    for name, value in started[0].items():
        assert torch.equal(value, weights[name]), name
    assert cli.main(["train", "grpo", *common, "--init-from", str(tmp_path / "nowhere")]) == 2
    assert "init_from" in capsys.readouterr().err


# ----- evaluation, diversity, plotting, config -----------------------------------------------------------
def test_sampled_evaluation_reports_pass_at_k(tmp_path, monkeypatch):
    def scripted(model, tokenizer, prompts, *, greedy=True, **kwargs):
        if greedy:
            texts = [RIGHT] * len(prompts)
        else:  # per problem of 4 samples: problem 0 right once, problem 1 never
            texts = [RIGHT, WRONG, WRONG, "The answer is 9."] + [WRONG] * 4
        return texts, [[1, 2, 3]] * len(prompts)

    monkeypatch.setattr(evaluation_module, "generate_completions", scripted)
    trainer = make_trainer(tmp_path, eval_problems=2, eval_samples=4)
    metrics = trainer.evaluate()
    assert metrics["eval/accuracy"] == 1.0  # greedy
    assert metrics["eval/pass@1"] == pytest.approx((1 / 4 + 0) / 2)
    assert metrics["eval/pass@2"] == pytest.approx((1 - 3 / 6) / 2)  # 1 - C(3,2)/C(4,2)
    assert metrics["eval/pass@4"] == pytest.approx(0.5)
    assert "eval/pass@8" not in metrics  # k above the sample count is not estimable
    assert metrics["eval/distinct_answers"] == pytest.approx((3 + 1) / 2)


def test_diversity_functions():
    assert distinct_answers([RIGHT, RIGHT, WRONG, "no number"]) == 3
    assert distinct_answers(["The answer is 7.", "\\boxed{7.0}"]) == 1
    assert distinct_ngram_ratio([["a", "b", "a", "b"]], n=2) == pytest.approx(2 / 3)  # ab, ba, ab
    assert distinct_ngram_ratio([["a", "b"], ["a", "b"]], n=1) == 0.5
    assert distinct_ngram_ratio([["a"]], n=2) == 0.0
    assert words("The  Answer\nis") == ["the", "answer", "is"]
    out = group_diversity(["x y", "x y", "The answer is 1", "The answer is 2"], group_size=2)
    assert out["diversity/distinct_answers"] == 1.5  # group 1: one (None); group 2: two
    assert out["diversity/distinct_answer_share"] == 0.75
    assert out["diversity/distinct_2grams"] == pytest.approx((1 / 2 + 4 / 6) / 2)
    with pytest.raises(ValueError, match="groups of 3"):
        group_diversity(["a", "b"], group_size=3)
    with pytest.raises(ValueError, match="n must be"):
        distinct_ngram_ratio([["a"]], n=0)


def test_plot_comparison(tmp_path):
    runs = {}
    for label, entropy in (("FD", 1.5), ("GRPO", 0.5)):
        folder = tmp_path / label
        folder.mkdir()
        records = [dict(step=s, entropy=entropy - 0.1 * s, **{"diversity/distinct_answers": 3 - s}) for s in (1, 2)]
        records.append({"step": 2, "eval/pass@1": 0.2, "eval/pass@2": 0.3, "eval/pass@4": 0.4, "eval/pass@8": 0.5})
        (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
        runs[label] = str(folder)
    path = plot_comparison(runs, str(tmp_path / "cmp.png"))
    assert os.path.getsize(path) > 1000


@pytest.mark.parametrize("field,value,match", [
    ("feedback", "oracle", "feedback must be one of"),
    ("teacher_frame", "hint", "teacher_frame must be one of"),
    ("distillation_weight", 1.5, "distillation_weight must be in"),
    ("distillation_weight", -0.1, "distillation_weight must be in"),
    ("divergence", "tv", "divergence must be one of"),
    ("jsd_beta", 2.0, "beta must be in"),
    ("teacher_temperature", 0.0, "teacher_temperature must be > 0"),
    ("clip", 0.0, "clip"),
    ("importance_clip", 0.0, "importance_clip must be > 0"),
    ("ema_rate", 0.0, "ema_rate must be in"),
    ("teacher", "frozen", "teacher must be one of"),
    ("eval_samples", 1, "eval_samples must be 0"),
    ("eval_samples", -2, "eval_samples must be >= 0"),
    ("lean_timeout", 0, "lean_timeout must be > 0"),
    ("critic_temperature", 0.0, "critic_temperature must be > 0"),
    ("critic_max_new_tokens", 0, "critic_max_new_tokens"),
    ("critic_model", "other", "critic_model is only used"),
    ("beta", 0.1, "beta .GRPO's KL"),
    ("num_generations", 0, "num_generations"),
])
def test_bad_config_fails_fast(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        fd_config(tmp_path, **{field: value}).validate()


@pytest.mark.parametrize("overrides,match", [
    (dict(distillation_weight=0.5, loss_type="grpo"), "loss_type must be 'dapo' or 'bnpo'"),
    (dict(distillation_weight=0.5, entropy_coef=0.1), "entropy_coef must be 0"),
    (dict(distillation_weight=0.5, num_generations=1), "must be >= 2"),
    (dict(include_sibling=True, num_generations=1), "must be >= 2"),
    (dict(importance_clip=2.0, distillation_weight=0.5), "pure Feedback Distillation"),
    (dict(importance_clip=2.0, top_k=20), "untruncated sampling"),
])
def test_bad_combinations_fail_fast(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        fd_config(tmp_path, **overrides).validate()
    with pytest.raises(ValueError, match=match):  # before any model is built
        FDTrainer(fd_config(tmp_path, **overrides))


@pytest.mark.parametrize("trainer_name,overrides", [
    ("fd", dict(importance_clip=1.05, temperature=0.7, loss_temperature=1.0)),  # the EMA teacher, sampling_logp
    ("fd", dict(distillation_weight=0.5)),  # the blend: GRPO's policy options on the step's head
    ("grpo", dict(beta=0.04, teacher="fixed", lora_r=4, lora_alpha=8)),  # the KL reference: the disabled adapter
    ("grpo", dict(beta=0.04, teacher="fixed")),  # the KL reference: a frozen copy with its own head
])
def test_a_training_step_reads_each_head_once(tmp_path, monkeypatch, trainer_name, overrides):
    """Under FSDP2 every read_head gathers the head's shards: one read per model per step (one micro-batch)."""
    reads = count_head_reads(monkeypatch)
    model, tok = tiny_model(seed=0)
    config = fd_config(tmp_path, batch_size=1, micro_batch_size=1, **overrides)
    if trainer_name == "grpo":
        config = GRPOLoopConfig(**{k: v for k, v in vars(config).items() if k in vars(GRPOLoopConfig())})
        trainer = GRPOLoopTrainer(config, model=model, tokenizer=tok, task=SevensTask(),
                                  rollout_engine=GroupEngine(tok))
    else:
        trainer = FDTrainer(config, model=model, tokenizer=tok, task=SevensTask(), rollout_engine=GroupEngine(tok))
    reads.clear()
    trainer.training_step()
    copy_model = trainer.teacher.copy
    assert (copy_model is None) == ("lora_r" in overrides)  # the shared head and the copy's both covered
    models = {id(boundary.unwrap(m)) for m in (trainer.model, copy_model) if m is not None}
    assert sorted(reads) == sorted(models), (len(reads), len(models))

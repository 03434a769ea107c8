"""The trainer core and the OPSD trainer on a tiny random model."""
import copy
import os

import pytest
import torch

from pydistill.models import tiny_model
from pydistill.trainers import OPSDConfig, OPSDTrainer
from pydistill.trainers.checkpoint import latest_checkpoint
from pydistill.boundary import read_head
from pydistill.trainers.contexts import build_context_batch, response_hidden_states
from tests.trainer_helpers import TASK, ScriptedEngine, tiny_config


def make_trainer(tmp_path, engine=True, seed=0, **overrides):
    model, tok = tiny_model(seed=seed)
    cfg = tiny_config(tmp_path, **overrides)
    return OPSDTrainer(cfg, model=model, tokenizer=tok, task=TASK,
                       rollout_engine=ScriptedEngine(tok) if engine else None)


def test_aligned_contexts_score_the_same_tokens():
    model, tok = tiny_model()
    prompts = [[5, 6, 7], [8, 9]]
    teacher_prompts = [[10, 11, 12, 13, 14], [15]]
    completions = [[20, 21, 22], [23]]
    student = build_context_batch(prompts, completions, tok.pad_token_id)
    teacher = build_context_batch(teacher_prompts, completions, tok.pad_token_id)
    assert torch.equal(student.targets, teacher.targets)
    assert torch.equal(student.completion_mask, teacher.completion_mask)
    hs, ht = response_hidden_states(model, student), response_hidden_states(model, teacher)
    weight = read_head(model).weight
    for row, (p, tp, c) in enumerate(zip(prompts, teacher_prompts, completions)):
        for ctx, hidden in ((p, hs), (tp, ht)):
            full = model(torch.tensor([ctx + c])).logits[0]  # direct full forward on the unpadded sequence
            want = torch.log_softmax(full[len(ctx) - 1:len(ctx) - 1 + len(c)], -1)
            got = torch.log_softmax(hidden[row, :len(c)] @ weight.t(), -1)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_no_logits_in_a_training_step(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path)
    head = trainer.model.get_output_embeddings()

    def refuse(*args, **kwargs):
        raise AssertionError("the lm_head was called: a [B, T, V] logits tensor would exist")

    monkeypatch.setattr(head, "forward", refuse)
    metrics = trainer.training_step()
    assert metrics["trained_tokens"] > 0 and metrics["loss"] >= 0


def test_loss_decreases_on_a_fixed_batch(tmp_path):
    trainer = make_trainer(tmp_path, learning_rate=3e-3, divergence="reverse_kl", clip=None)
    with torch.no_grad():  # move the student away from its frozen teacher copy, so there is a gap to close
        torch.manual_seed(3)
        for p in trainer.model.parameters():
            p.add_(0.5 * torch.randn_like(p) * p.std())
    problems = trainer.train_pool[:4]
    prepared = [trainer.prepare(problems[:2]), trainer.prepare(problems[2:])]
    losses = []
    for _ in range(8):
        total = 0.0
        for batch in prepared:
            out = trainer.loss(batch, 1.0 * sum(p["tokens"] for p in prepared))
            out.loss.backward()
            total += out.loss.item()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        losses.append(total)
    assert losses[-1] < 0.5 * losses[0], losses


def test_fixed_teacher_is_the_initial_model(tmp_path):
    # full fine-tune: a frozen copy; after a step the student moves, the teacher does not
    trainer = make_trainer(tmp_path, learning_rate=1e-2)
    initial = copy.deepcopy(trainer.model)
    trainer.training_step()
    batch = trainer.prepare(trainer.train_pool[:2])["teacher"]
    torch.testing.assert_close(trainer.teacher.hidden_states(batch), response_hidden_states(initial, batch))
    assert not torch.allclose(response_hidden_states(trainer.model, batch), response_hidden_states(initial, batch))


def test_fixed_teacher_under_lora_disables_the_adapter(tmp_path):
    trainer = make_trainer(tmp_path, lora_r=4, lora_alpha=8, learning_rate=5e-2)
    assert trainer.teacher.copy is None  # no second copy of the weights
    base_before = copy.deepcopy(trainer.model.get_base_model())
    trainer.training_step()
    batch = trainer.prepare(trainer.train_pool[:2])["teacher"]
    with trainer.model.disable_adapter():
        base_now = response_hidden_states(trainer.model, batch)
    torch.testing.assert_close(trainer.teacher.hidden_states(batch), base_now)
    assert not torch.allclose(response_hidden_states(trainer.model, batch), base_now)  # the adapter learned


def test_ema_teacher_moves_by_the_rate(tmp_path):
    trainer = make_trainer(tmp_path, teacher="ema", ema_rate=0.25, learning_rate=1e-2)
    before = {n: p.detach().clone() for n, p in trainer.teacher.copy.named_parameters()}
    trainer.training_step()
    student = dict(trainer.model.named_parameters())
    for name, p in trainer.teacher.copy.named_parameters():
        torch.testing.assert_close(p, 0.75 * before[name] + 0.25 * student[name].detach())


@pytest.mark.parametrize("teacher", ["fixed", "ema"])
def test_resume_is_exact(tmp_path, teacher):
    # real sampling (seeded generate), so the RNG state must survive the checkpoint too
    straight = make_trainer(tmp_path / "a", engine=False, max_steps=4, teacher=teacher, ema_rate=0.5)
    straight.train()
    first = make_trainer(tmp_path / "b", engine=False, max_steps=2, teacher=teacher, ema_rate=0.5)
    first.train()
    assert latest_checkpoint(first.config.output_dir).endswith("checkpoint-2")
    # The fixed teacher is the base model's initial weights, which a resumed run reloads like any run; the
    # trained weights and the EMA teacher must come from the checkpoint, so start those from another init.
    resumed = make_trainer(tmp_path / "b", engine=False, max_steps=4, resume=True, teacher=teacher, ema_rate=0.5,
                           seed=0 if teacher == "fixed" else 7)
    assert resumed.step == 2 and resumed.data_position == 8
    resumed.train()
    for (n, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), n
    if teacher == "ema":
        for (n, a), (_, b) in zip(straight.teacher.copy.named_parameters(), resumed.teacher.copy.named_parameters()):
            assert torch.equal(a, b), n


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.train()
    good = latest_checkpoint(trainer.config.output_dir)
    import pydistill.trainers.checkpoint as ckpt

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ckpt, "save_file", crash)
    trainer.step = 5
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    assert latest_checkpoint(trainer.config.output_dir) == good
    assert not any(name.startswith(".tmp") for name in os.listdir(trainer.config.output_dir))


def test_metrics_and_time_budget(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=50, time_budget_s=1e-9, eval_problems=2, eval_max_new_tokens=4)
    summary = trainer.train()
    assert trainer.step == 1  # the budget is checked before each step
    assert "eval/accuracy" in summary
    from pydistill.trainers.metrics import read_metrics

    records = read_metrics(os.path.join(trainer.config.output_dir, "metrics.jsonl"))
    for key in ("loss", "divergence", "reward", "entropy", "tokens_per_second", "peak_memory_mb"):
        assert key in records[0], key


def test_generated_token_budget_stops_and_survives_resume(tmp_path):
    # the scripted rollouts are 11 tokens each (10 + EOS); 4 rollouts a step
    trainer = make_trainer(tmp_path, max_steps=50, generated_token_budget=60)
    trainer.train()
    assert trainer.step == 2 and trainer.generated_tokens == 88  # 44 < 60 after one step, 88 >= 60 after two
    resumed = make_trainer(tmp_path, max_steps=50, generated_token_budget=100, resume=True)
    assert resumed.generated_tokens == 88
    resumed.train()
    assert resumed.step == 3 and resumed.generated_tokens == 132


def test_sampled_token_variant_trains(tmp_path):
    trainer = make_trainer(tmp_path, sampled_token=True)
    metrics = trainer.training_step()
    assert "advantage" in metrics and torch.isfinite(torch.tensor(metrics["loss"]))


@pytest.mark.parametrize("overrides,match", [
    (dict(divergence="kl"), "divergence must be one of"),
    (dict(num_generations=0), r"group size \(num_generations\) must be a positive integer"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(task="gsm8k", data_path="/no/such/gsm8k.jsonl"), "data_path '/no/such/gsm8k.jsonl' does not exist"),
    (dict(teacher="frozen"), "teacher must be one of"),
    (dict(batch_size=6, micro_batch_size=4), "micro_batch_size 4 must divide batch_size 6"),
    (dict(clip=0.0), r"clip \(tau\) must be > 0"),
    (dict(beta=2.0), r"beta must be in \[0, 1\]"),
    (dict(generated_token_budget=-1), "generated_token_budget must be >= 0"),
    (dict(init_from="/no/such/run"), "init_from '/no/such/run' does not exist"),
])
def test_bad_config_fails_fast(overrides, match):
    with pytest.raises(ValueError, match=match):
        OPSDConfig(**overrides).validate()


def test_unknown_config_field():
    with pytest.raises(ValueError, match="unknown config field"):
        OPSDConfig.from_dict({"learning_rat": 1e-4})


def test_a_served_teacher_gives_the_local_teachers_loss(tmp_path):
    """teacher_url: the reference-solution context scored by a server holding the initial weights. With k = V its
    top-k covers the vocabulary, so the loss equals the local fixed teacher's (the tail bucket floored at ~1e-7)."""
    from tests.teacher_server import TeacherServer

    local = make_trainer(tmp_path / "local", clip=None)
    vocab = read_head(local.model).weight.shape[0]
    prepared = local.prepare(local.train_pool[:2])
    want = local.loss(prepared, float(prepared["tokens"]))
    with TeacherServer(copy.deepcopy(local.model)) as server:
        served = make_trainer(tmp_path / "served", clip=None, teacher_url=server.url, teacher_top_k=vocab)
        assert served.teacher is None  # no local teacher weights are kept
        got = served.loss(prepared, float(prepared["tokens"]))
        contexts = [r for r in server.requests if r[0] == "/v1/completions"]
    assert contexts and all(r[1]["prompt_logprobs"] == vocab for r in contexts)
    assert float(want.loss) > 0
    assert float(got.loss) == pytest.approx(float(want.loss), rel=1e-4, abs=1e-6)
    got.loss.backward()


@pytest.mark.parametrize("overrides, match", [
    (dict(teacher_url="localhost:8000"), "teacher_url must be an http:// or https:// address"),
    (dict(teacher_url="http://127.0.0.1:1", sampled_token=True), "use one or the other"),
    (dict(teacher_top_k=0), "teacher_top_k must be an integer >= 1"),
])
def test_served_teacher_settings_are_checked(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, **overrides)

"""The plain-SFT baseline trainer on a tiny model: the step against an eager float64 NLL, masks, training."""
import pytest
import torch

from pydistill.cli import build_parser, load_config
from pydistill.models import tiny_model
from pydistill.prompts import render, student_messages
from pydistill.trainers import SFTConfig, SFTTrainer
from pydistill.boundary import read_head
from tests.trainer_helpers import TASK


def make_trainer(tmp_path, **overrides):
    values = dict(model="tiny", lora_r=0, max_steps=2, batch_size=4, micro_batch_size=2, eval_problems=0,
                  output_dir=str(tmp_path / "run"), learning_rate=1e-2, progress=False, train_problems=8,
                  max_grad_norm=1e9)
    values.update(overrides)
    model, tok = tiny_model()
    return SFTTrainer(SFTConfig(**values), model=model, tokenizer=tok, task=TASK)


def eager_nll(model, tok, problems):
    """Token-mean NLL of each reference solution (+ EOS) after its student prompt, from full float64 logits."""
    total, count = 0.0, 0
    for p in problems:
        prompt = tok(render(tok, student_messages(p.question)), add_special_tokens=False)["input_ids"]
        answer = tok(p.solution.strip(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt + answer])
        hidden = model.model(input_ids=ids).last_hidden_state[0, len(prompt) - 1:-1]
        logits = hidden.double() @ read_head(model).weight.double().t()
        total = total - torch.log_softmax(logits, -1).gather(1, torch.tensor(answer).unsqueeze(1)).sum()
        count += len(answer)
    return total / count


def test_step_matches_eager_nll_of_the_solutions(tmp_path):
    trainer = make_trainer(tmp_path)
    problems = trainer.train_pool[:4]
    prepared = [trainer.prepare(problems[:2]), trainer.prepare(problems[2:])]
    tokens = sum(p["tokens"] for p in prepared)
    loss = sum(trainer.loss(p, float(tokens)).loss for p in prepared)
    loss.backward()
    got = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    trainer.model.zero_grad()
    want = eager_nll(trainer.model, trainer.tokenizer, problems)
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_only_solution_tokens_are_scored_and_no_rollouts(tmp_path):
    trainer = make_trainer(tmp_path)
    problem = trainer.train_pool[0]
    prepared = trainer.prepare([problem])
    tok = trainer.tokenizer
    answer = tok(problem.solution.strip(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert prepared["tokens"] == len(answer) and prepared["generated_tokens"] == 0
    assert prepared["batch"].targets[0, :len(answer)].tolist() == answer
    assert trainer.teacher is None  # no frozen copy kept


def test_training_lowers_the_nll(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=8, train_problems=4)
    with torch.no_grad():
        before = float(eager_nll(trainer.model, trainer.tokenizer, trainer.train_pool))
    trainer.train()
    with torch.no_grad():
        after = float(eager_nll(trainer.model, trainer.tokenizer, trainer.train_pool))
    assert after < 0.7 * before, (before, after)


def test_cli_parses_sft_flags():
    args = build_parser().parse_args(["train", "sft", "--learning-rate", "3e-5", "--max-steps", "7"])
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "method", "config")}
    cfg = load_config(SFTConfig, None, overrides)
    assert cfg.learning_rate == 3e-5 and cfg.max_steps == 7


def test_bad_config_fails_fast():
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        SFTConfig(learning_rate=0.0).validate()

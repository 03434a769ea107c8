"""A tiny model, a tiny task and a deterministic rollout engine for trainer tests."""
from __future__ import annotations

from pydistill.tasks import ArithmeticTask
from pydistill.trainers import OPSDConfig
from pydistill.trainers.rollout import Rollouts


class ScriptedEngine:
    """Deterministic rollouts: each prompt's completion is a fixed text chosen by the prompt's length."""

    def __init__(self, tokenizer, texts=("3 + 4 = 7. The answer is 7.", "5 * 2 = 11. The answer is 11.")):
        self.tokenizer = tokenizer
        self.texts = texts

    def sample(self, prompts, settings):
        repeated = [p for p in prompts for _ in range(settings.n)]
        tok = self.tokenizer
        ids = [tok(self.texts[len(p) % len(self.texts)], add_special_tokens=False)["input_ids"][:settings.max_new_tokens]
               + [tok.eos_token_id] for p in repeated]
        return Rollouts(repeated, [tok(p, add_special_tokens=False)["input_ids"] for p in repeated], ids,
                        [tok.decode(i, skip_special_tokens=True) for i in ids])


def tiny_config(tmp_path, **overrides):
    values = dict(model="tiny", lora_r=0, max_steps=2, batch_size=4, micro_batch_size=2, max_new_tokens=10,
                  eval_problems=0, output_dir=str(tmp_path / "run"), learning_rate=5e-3, progress=False,
                  train_problems=16, max_grad_norm=1.0)
    values.update(overrides)
    return OPSDConfig(**values)


TASK = ArithmeticTask()


class GroupEngine:
    """Deterministic group rollouts with a scripted mix of right and wrong answers (GRPO, ROSD tests).

    The problem behind a prompt is found by its question; ``patterns[i % len(patterns)]`` scripts the group of
    the i-th problem of ``problems``, one letter per rollout (cycled over the group):
    R correct, L correct and longer, W a wrong step "a op b = c+1" after a short lead-in (the step checker finds
    it), P a right step but a wrong final answer (the step checker finds nothing). Prompts of no known problem
    and reflection prompts are answered by ``reply(prompt)``.
    """

    PATTERNS = ("RWLP", "WWPW", "RRLR", "LWRW")

    def __init__(self, tokenizer, problems, patterns=PATTERNS, reply=None):
        self.tokenizer, self.problems, self.patterns, self.reply = tokenizer, list(problems), patterns, reply
        self.calls = []

    def problem_of(self, prompt):
        for i, p in enumerate(self.problems):
            if p.question in prompt:
                return i, p
        return None, None

    @staticmethod
    def text(problem, kind):
        import re

        expression = re.search(r"^(.+?) = -?\d+\.", problem.solution).group(1)
        answer = int(problem.answer)
        return {"R": f"{expression} = {answer}. The answer is {answer}.",
                "L": f"We have {expression} = {answer}, so the answer is {answer}.",
                "W": f"First, {expression} = {answer + 1}. The answer is {answer + 1}.",
                "P": f"{expression} = {answer}. The answer is {answer + 2}."}[kind]

    def sample(self, prompts, settings):
        self.calls.append((list(prompts), settings))
        tok = self.tokenizer
        texts = []
        for prompt in prompts:
            index, problem = self.problem_of(prompt) if "Attempt to review" not in prompt else (None, None)
            for j in range(settings.n):
                if problem is None:
                    texts.append(self.reply(prompt) if self.reply else "")
                else:
                    pattern = self.patterns[index % len(self.patterns)]
                    texts.append(self.text(problem, pattern[j % len(pattern)]))
        ids = [tok(t, add_special_tokens=False)["input_ids"][:settings.max_new_tokens - 1] + [tok.eos_token_id]
               for t in texts]
        repeated = [p for p in prompts for _ in range(settings.n)]
        return Rollouts(repeated, [tok(p, add_special_tokens=False)["input_ids"] for p in repeated], ids,
                        [tok.decode(i, skip_special_tokens=True) for i in ids])


def step_gradients(trainer):
    """One real training step whose optimizer update is replaced by a copy of the accumulated gradients."""
    import torch

    grads = {}

    def capture(*args, **kwargs):
        for name, p in trainer.model.named_parameters():
            if p.requires_grad:
                grads[name] = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()

    trainer.optimizer.step = capture
    return trainer.training_step(), grads


def count_op_rows(monkeypatch):
    """Record the number of rows each call of the fused op receives (after the mask's gather)."""
    import importlib

    module = importlib.import_module("pydistill.token_stats")  # the package re-exports the function
    rows = []
    original = module._TokenStatsFunction.apply

    def counting(hidden, *args):
        rows.append(hidden.shape[0])
        return original(hidden, *args)

    monkeypatch.setattr(module._TokenStatsFunction, "apply", counting)
    return rows

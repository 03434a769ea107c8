"""The OPSD trainer: the student's rollout scored by the same model reading the reference solution."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ...losses import distillation_loss, sampled_token_distillation_loss
from ...prompts import opsd_teacher_messages, render, student_messages
from ...boundary import Head, head_token_stats, read_head
from ..contexts import build_context_batch, head_options, response_hidden_states, teacher_head
from ..config import loss_temperature
from ..core import Trainer
from ..teacher import served_teacher


class ScoredContexts(NamedTuple):
    """What every spelling of the OPSD loss reads: both context batches, their hidden states and the heads
    (``teacher_head`` None: the teacher reads the student's head)."""
    student: object
    teacher: object
    hidden: torch.Tensor
    teacher_hidden: torch.Tensor
    head: Head
    teacher_head: Optional[Head]


class OPSDTrainer(Trainer):
    method = "opsd"

    def uses_teacher(self) -> bool:
        return self.config.teacher_url is None  # a served teacher holds no weights here

    def prepare(self, problems: list) -> dict:
        tok, n = self.tokenizer, self.config.num_generations
        student_prompts = [render(tok, student_messages(p.question)) for p in problems]
        teacher_prompts = [render(tok, opsd_teacher_messages(p.question, p.solution)) for p in problems]
        rollouts = self.engine.sample(student_prompts, self.sampling)
        teacher_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in teacher_prompts for _ in range(n)]
        device = self.accelerator.device
        student = build_context_batch(rollouts.prompt_ids, rollouts.completion_ids, tok.pad_token_id, device)
        teacher = build_context_batch(teacher_ids, rollouts.completion_ids, tok.pad_token_id, device)
        rewards = [float(self.task.is_correct(p, text)) for p, text in
                   zip([p for p in problems for _ in range(n)], rollouts.texts)]
        tokens = int(student.completion_mask.sum())
        return dict(student=student, teacher=teacher, tokens=tokens, generated_tokens=tokens,
                    metrics=dict(reward=sum(rewards) / len(rewards),
                                 completion_tokens=tokens / len(rollouts.completion_ids)))

    def scored_contexts(self, prepared: dict) -> ScoredContexts:
        student, teacher = prepared["student"], prepared["teacher"]
        head, t_head = read_head(self.model), teacher_head(self.teacher)  # once per step each (FSDP2 gathers them)
        return ScoredContexts(student, teacher, response_hidden_states(self.policy, student, head),
                              self.teacher.hidden_states(teacher, t_head or head), head, t_head)

    def loss(self, prepared: dict, num_items_in_batch: float):
        cfg = self.config
        options = dict(temperature=loss_temperature(cfg), num_items_in_batch=num_items_in_batch, impl=cfg.impl,
                       memory_budget_mb=cfg.memory_budget_mb)
        served = served_teacher(self, loss_temperature(self.config))
        if served is not None:
            student, head = prepared["student"], read_head(self.model)
            ids, logprobs = served.topk(prepared["teacher"])
            return distillation_loss(response_hidden_states(self.policy, student, head), head.weight, None,
                                     student.completion_mask, teacher_topk_ids=ids, teacher_topk_logprobs=logprobs,
                                     divergence=cfg.divergence, beta=cfg.beta, clip=cfg.clip, **head_options(head),
                                     **options)
        student, teacher, hidden, teacher_hidden, head, t_head = self.scored_contexts(prepared)
        if cfg.sampled_token:
            with torch.no_grad():
                teacher_logp = head_token_stats(t_head or head, teacher_hidden, teacher.completion_mask,
                                                targets=teacher.targets, temperature=options["temperature"],
                                                impl=cfg.impl, memory_budget_mb=cfg.memory_budget_mb).logp
            return sampled_token_distillation_loss(hidden, head.weight, student.targets, teacher_logp,
                                                   student.completion_mask, **head_options(head), **options)
        return distillation_loss(hidden, head.weight, teacher_hidden, student.completion_mask,
                                 divergence=cfg.divergence, beta=cfg.beta, clip=cfg.clip,
                                 **head_options(head, t_head), **options)

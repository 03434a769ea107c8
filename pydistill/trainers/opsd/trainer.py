"""The OPSD trainer: the student's rollout scored by the same model reading the reference solution."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ...losses import distillation_loss, sampled_token_distillation_loss
from ...prompts import opsd_teacher_messages, render, student_messages
from ...token_stats import token_stats
from ..contexts import build_context_batch, lm_head_bias, lm_head_softcap, lm_head_weight, response_hidden_states
from ..config import loss_temperature
from ..core import Trainer
from ..teacher import ServedTeacher


class ScoredContexts(NamedTuple):
    """What every spelling of the OPSD loss reads: both context batches, their last hidden states and the
    heads (``teacher_weight`` None: the teacher shares the student's head)."""
    student: object
    teacher: object
    hidden: torch.Tensor
    teacher_hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    teacher_weight: Optional[torch.Tensor]


class OPSDTrainer(Trainer):
    method = "opsd"

    def uses_teacher(self) -> bool:
        return self.config.teacher_url is None  # a served teacher holds no weights here

    def teacher_on_server(self):
        """The served teacher of ``teacher_url`` (built on first use), or None for the local one."""
        cfg = self.config
        if cfg.teacher_url is None:
            return None
        if getattr(self, "_served", None) is None:
            self._served = ServedTeacher(cfg.teacher_url, cfg.teacher_top_k, model=cfg.teacher_served_model,
                                         temperature=loss_temperature(cfg))
        return self._served

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
        return ScoredContexts(student, teacher, response_hidden_states(self.policy, student),
                              self.teacher.hidden_states(teacher), lm_head_weight(self.model),
                              lm_head_bias(self.model), self.teacher.lm_head_weight())

    def loss(self, prepared: dict, num_items_in_batch: float):
        cfg = self.config
        served = self.teacher_on_server()
        if served is not None:
            student = prepared["student"]
            ids, logprobs = served.topk(prepared["teacher"])
            return distillation_loss(response_hidden_states(self.policy, student), lm_head_weight(self.model), None,
                                     student.completion_mask, teacher_topk_ids=ids, teacher_topk_logprobs=logprobs,
                                     divergence=cfg.divergence, beta=cfg.beta, clip=cfg.clip,
                                     temperature=loss_temperature(cfg), bias=lm_head_bias(self.model),
                                     num_items_in_batch=num_items_in_batch, impl=cfg.impl,
                                     memory_budget_mb=cfg.memory_budget_mb, softcap=lm_head_softcap(self.model))
        student, teacher, hidden, teacher_hidden, weight, bias, teacher_weight = self.scored_contexts(prepared)
        if cfg.sampled_token:
            with torch.no_grad():
                b, t, _ = teacher_hidden.shape
                flat_targets = torch.where(teacher.completion_mask, teacher.targets,
                                           torch.full_like(teacher.targets, -100)).reshape(-1)
                teacher_logp = token_stats(teacher_hidden.reshape(b * t, -1),
                                           weight if teacher_weight is None else teacher_weight,
                                           targets=flat_targets, bias=bias, temperature=loss_temperature(cfg),
                                           impl=cfg.impl, memory_budget_mb=cfg.memory_budget_mb,
                                           softcap=lm_head_softcap(self.model)).logp.reshape(b, t)
            return sampled_token_distillation_loss(hidden, weight, student.targets, teacher_logp,
                                                   student.completion_mask, temperature=loss_temperature(cfg),
                                                   bias=bias, num_items_in_batch=num_items_in_batch, impl=cfg.impl,
                                                   memory_budget_mb=cfg.memory_budget_mb,
                                                   softcap=lm_head_softcap(self.model))
        return distillation_loss(hidden, weight, teacher_hidden, student.completion_mask,
                                 teacher_weight=teacher_weight, divergence=cfg.divergence, beta=cfg.beta,
                                 clip=cfg.clip, temperature=loss_temperature(cfg), bias=bias,
                                 teacher_bias=bias if teacher_weight is not None else None,
                                 num_items_in_batch=num_items_in_batch, impl=cfg.impl,
                                 memory_budget_mb=cfg.memory_budget_mb, softcap=lm_head_softcap(self.model))

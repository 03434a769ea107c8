"""The GRPO trainer: G rollouts per prompt, group advantages, the fused clipped surrogate (see the package
docstring)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ...diversity import group_diversity
from ...losses import grpo_loss
from ...boundary import Head, head_token_stats, read_head
from ..contexts import response_hidden_states, teacher_head
from ..core import Trainer
from ..groups import completion_length_metrics, reward_function, sample_groups, step_advantages
from .config import GRPOLoopConfig


class GRPOLoopTrainer(Trainer):
    method = "grpo"

    def __init__(self, config: GRPOLoopConfig, *args, reward_functions: Optional[Sequence] = None,
                 reward_weights: Optional[Sequence[float]] = None, **kwargs):
        """``reward_functions``: callables that replace the config's named ones (with ``reward_weights``), with
        TRL's signature ``(prompts, completions, **kwargs) -> list[float]`` (kwargs: the dataset's other
        columns and ``completion_ids``) or ``(problems, completions) -> list[float]``; see :mod:`pydistill.rewards`."""
        super().__init__(config, *args, **kwargs)
        self.reward = reward_function(self.task, config.reward_functions, config.reward_weights,
                                      reward_functions, reward_weights, max_failures=config.max_reward_failures)

    def uses_teacher(self) -> bool:
        return self.config.beta > 0  # the reference model of the KL term

    def prepare(self, problems: list) -> dict:
        batch = sample_groups(self, problems, self.reward)
        tokens = int(batch.student.completion_mask.sum())
        return dict(groups=batch, tokens=tokens, generated_tokens=tokens)

    def finalize_batch(self, prepared: list) -> None:
        """Advantages over the process's whole batch (so that "batch" scaling sees every group)."""
        cfg = self.config
        advantages, zero_spread = step_advantages(self, [p["groups"].rewards for p in prepared],
                                                  cfg.num_generations, cfg.scale_rewards)
        for p, adv in zip(prepared, advantages):
            p["advantages"] = adv
            p["metrics"] = self.group_metrics(p["groups"], zero_spread)

    def group_metrics(self, batch, zero_spread_fraction: float) -> dict:
        finite = batch.rewards[~torch.isnan(batch.rewards)]
        metrics = dict(reward=float(finite.mean()) if len(finite) else 0.0,
                       reward_std=float(finite.std()) if len(finite) > 1 else 0.0,
                       accuracy=float(batch.correct.float().mean()), zero_spread_fraction=zero_spread_fraction,
                       **completion_length_metrics(batch), **group_diversity(batch.rollouts.texts, batch.group_size))
        for name, column in batch.reward_columns.items():
            finite_column = [v for v in column if math.isfinite(v)]  # unscorable values are counted apart
            metrics[f"rewards/{name}"] = sum(finite_column) / len(finite_column) if finite_column else 0.0
        return metrics

    def trained_mask(self, prepared: dict) -> torch.Tensor:
        """Completion tokens handed to the op: zero-advantage rollouts are dropped when their loss is 0."""
        mask = prepared["groups"].student.completion_mask
        cfg = self.config
        if cfg.skip_zero_advantage and cfg.beta == 0 and cfg.entropy_coef == 0:
            mask = mask & (prepared["advantages"] != 0).to(mask.device).unsqueeze(1)
        return mask

    def reference_logp(self, student, mask, head: Optional[Head] = None) -> torch.Tensor:
        """log pi_ref(y_t) [B, T] of the initial weights, for the k3 KL term. ``head``: the student's, when the
        step already read it (a reference that shares it, LoRA's disabled adapter, reads it again otherwise)."""
        with torch.no_grad():
            head = teacher_head(self.teacher) or (read_head(self.model) if head is None else head)
            return head_token_stats(head, self.teacher.hidden_states(student, head), mask, targets=student.targets,
                                    impl=self.config.impl, memory_budget_mb=self.config.memory_budget_mb).logp

    def policy_loss_options(self, prepared: dict, num_items_in_batch: float, head: Head) -> dict:
        """The keyword arguments of the fused policy-gradient loss for one micro-batch on the step's ``head``."""
        cfg, student = self.config, prepared["groups"].student
        mask = self.trained_mask(prepared)
        return dict(targets=student.targets, advantages=prepared["advantages"].to(self.accelerator.device),
                    mask=mask, ref_logp=self.reference_logp(student, mask, head) if cfg.beta > 0 else None,
                    epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high, delta=cfg.delta,
                    importance_sampling_level=cfg.importance_sampling_level, loss_type=cfg.loss_type,
                    max_completion_length=cfg.max_new_tokens, num_items_in_batch=num_items_in_batch,
                    bias=head.bias, softcap=head.softcap, impl=cfg.impl, memory_budget_mb=cfg.memory_budget_mb)

    def sequence_share(self, prepared: dict) -> float:
        """This micro-batch's share of the global batch's sequences. The "grpo" and "dr_grpo" losses average
        over sequences; scaling each micro-batch's mean by its share makes the accumulated gradient the mean
        over the whole optimizer batch (dapo/bnpo are normalized by the global token count instead)."""
        if self.config.loss_type in ("grpo", "dr_grpo"):
            return len(prepared["groups"].rewards) / (self.config.batch_size * self.config.num_generations)
        return 1.0

    def loss(self, prepared: dict, num_items_in_batch: float):
        cfg = self.config
        head = read_head(self.model)  # once per step: under FSDP2 each read gathers the head's shards
        options = self.policy_loss_options(prepared, num_items_in_batch, head)
        hidden = response_hidden_states(self.policy, prepared["groups"].student, head)
        out = grpo_loss(hidden, head.weight, options.pop("targets"), options.pop("advantages"),
                        options.pop("mask"), beta=cfg.beta, entropy_coef=cfg.entropy_coef, **options)
        return out._replace(loss=out.loss * self.sequence_share(prepared))

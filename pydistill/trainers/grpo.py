"""GRPO baseline (TRL semantics): G rollouts per prompt, verifier rewards, group advantages, clipped surrogate.

The rewards of each prompt's G completions become advantages A = (r - mean) / (std + 1e-4) (``scale_rewards``
"group"; "batch" uses the whole batch's std, "none" does not divide); the loss is the fused clipped surrogate
of :func:`pydistill.losses.grpo_loss` on the policy's hidden states, with an optional k3 KL to a reference
model (the initial weights: the LoRA adapter disabled, or a frozen copy) when ``beta`` > 0. Rollouts of
zero-spread groups have advantage 0: with ``beta`` = 0 and no entropy bonus their loss is exactly 0, so their
tokens are left out of the op (no FLOPs) while still counting in the normalization.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..diversity import group_diversity
from ..losses import LOSS_TYPES, grpo_loss
from ..losses.advantages import SCALINGS
from ..token_stats import token_stats
from .config import TrainConfig
from .contexts import lm_head_bias, lm_head_weight, response_hidden_states
from .core import Trainer
from .fields import Literal, option
from .groups import (check_reward_names, completion_length_metrics, reward_function, sample_groups,
                     step_advantages)


@dataclass
class GRPOConfig(TrainConfig):
    """TRL's names and defaults where TRL has them."""

    num_generations: int = 8
    temperature: float = 1.0
    max_completion_length: Optional[int] = option(None, "TRL's name for max_new_tokens; overrides it when set")
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = option("dapo", "grpo | bnpo | dr_grpo | dapo "
                                                                           "(normalizations: "
                                                                           "pydistill.losses.grpo_loss)")
    epsilon: float = option(0.2, "lower clip of the ratio (1 - epsilon)")
    epsilon_high: Optional[float] = option(None, "upper clip (1 + epsilon_high); None: epsilon")
    delta: Optional[float] = option(None, "two-sided clipping: cap on the unclipped ratio (> 1)")
    importance_sampling_level: Literal["token", "sequence"] = option("token", "token (GRPO) | sequence (GSPO)")
    beta: float = option(0.0, "k3 KL to the reference model (the initial weights)")
    scale_rewards: Literal["group", "batch", "none"] = option(
        "group", "advantage scaling: group std, batch std or none (Dr. GRPO)")
    reward_functions: str = option("accuracy", "comma-separated: accuracy, format")
    reward_weights: Optional[str] = option(None, "comma-separated weights, one per reward function")
    entropy_coef: float = 0.0
    skip_zero_advantage: bool = option(True, "leave zero-advantage rollouts out of the op when their loss is 0")
    output_dir: str = "runs/grpo"

    def validate(self):
        if self.max_completion_length is not None:
            self.max_new_tokens = self.max_completion_length
        super().validate()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.scale_rewards not in SCALINGS:
            raise ValueError(f"scale_rewards must be one of {SCALINGS}, got {self.scale_rewards!r}")
        if not 0 <= self.epsilon < 1:
            raise ValueError(f"epsilon must be in [0, 1), got {self.epsilon}")
        if self.epsilon_high is not None and self.epsilon_high < 0:
            raise ValueError(f"epsilon_high must be >= 0, got {self.epsilon_high}")
        if self.delta is not None and not self.delta > 1:
            raise ValueError(f"delta must be > 1, got {self.delta}")
        if self.beta < 0:
            raise ValueError(f"beta (KL coefficient) must be >= 0, got {self.beta}")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', "
                             f"got {self.importance_sampling_level!r}")
        check_reward_names(self.reward_functions, self.reward_weights)
        if not self.entropy_coef >= 0:
            raise ValueError(f"entropy_coef must be >= 0, got {self.entropy_coef}")
        return self


class GRPOTrainer(Trainer):
    method = "grpo"

    def __init__(self, config: GRPOConfig, *args, reward_functions: Optional[Sequence] = None,
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

    def reference_logp(self, student, mask) -> torch.Tensor:
        """log pi_ref(y_t) [B, T] of the initial weights, for the k3 KL term."""
        with torch.no_grad():
            hidden = self.teacher.hidden_states(student)
            weight = self.teacher.lm_head_weight()
            b, t, width = hidden.shape
            targets = torch.where(mask, student.targets, torch.full_like(student.targets, -100)).reshape(-1)
            return token_stats(hidden.reshape(b * t, width), lm_head_weight(self.model) if weight is None else weight,
                               targets=targets, bias=lm_head_bias(self.model), mask=mask.reshape(-1),
                               impl=self.config.impl).logp.reshape(b, t)

    def policy_loss_options(self, prepared: dict, num_items_in_batch: float) -> dict:
        """The keyword arguments of the fused policy-gradient loss for one micro-batch."""
        cfg, student = self.config, prepared["groups"].student
        mask = self.trained_mask(prepared)
        return dict(targets=student.targets, advantages=prepared["advantages"].to(self.accelerator.device),
                    mask=mask, ref_logp=self.reference_logp(student, mask) if cfg.beta > 0 else None,
                    epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high, delta=cfg.delta,
                    importance_sampling_level=cfg.importance_sampling_level, loss_type=cfg.loss_type,
                    max_completion_length=cfg.max_new_tokens, num_items_in_batch=num_items_in_batch,
                    bias=lm_head_bias(self.model), impl=cfg.impl)

    def sequence_share(self, prepared: dict) -> float:
        """This micro-batch's share of the global batch's sequences. The "grpo" and "dr_grpo" losses average
        over sequences; scaling each micro-batch's mean by its share makes the accumulated gradient the mean
        over the whole optimizer batch (dapo/bnpo are normalized by the global token count instead)."""
        if self.config.loss_type in ("grpo", "dr_grpo"):
            return len(prepared["groups"].rewards) / (self.config.batch_size * self.config.num_generations)
        return 1.0

    def loss(self, prepared: dict, num_items_in_batch: float):
        cfg = self.config
        options = self.policy_loss_options(prepared, num_items_in_batch)
        hidden = response_hidden_states(self.policy, prepared["groups"].student)
        out = grpo_loss(hidden, lm_head_weight(self.model), options.pop("targets"), options.pop("advantages"),
                        options.pop("mask"), beta=cfg.beta, entropy_coef=cfg.entropy_coef, **options)
        return out._replace(loss=out.loss * self.sequence_share(prepared))

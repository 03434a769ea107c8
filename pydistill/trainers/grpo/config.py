"""GRPO's options: the surrogate's clipping and normalization, the KL to a reference, the rewards."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import TrainConfig
from ..fields import Literal, option
from ..groups import check_reward_names


def _trl_default(name: str, default, help: str):
    """The shared field ``name`` with TRL's default (its help text and aliases kept)."""
    base = TrainConfig.__dataclass_fields__[name]
    return option(default, f"{help} (TRL's default)", **{k: v for k, v in base.metadata.items() if k != "help"})


@dataclass
class GRPOLoopConfig(TrainConfig):
    """TRL's names and defaults (``trl.GRPOConfig`` of trl 1.16) where TRL has them: learning rate 1e-6, a
    linear schedule, gradient clipping at 1.0, 512 new tokens, seed 42, no LoRA, 8 generations, temperature
    1.0, the DAPO loss, beta 0. What differs, and why: ``batch_size`` counts prompts per optimizer step across
    processes and accumulation (TRL counts completions per device); ``max_steps`` defaults to 100 (TRL's -1
    means "epochs", and the built-in tasks are cycled pools); ``eval_problems`` 64 (TRL evaluates only with an
    eval dataset). Feedback Distillation and ExGRPO extend this config and inherit these defaults."""

    learning_rate: float = _trl_default("learning_rate", 1e-6, "AdamW learning rate")
    lr_scheduler: str = _trl_default("lr_scheduler", "linear", "transformers scheduler name (constant_with_warmup, "
                                     "linear, cosine, ...); TRL's name lr_scheduler_type is accepted too")
    max_grad_norm: float = _trl_default("max_grad_norm", 1.0, "gradient clipping norm")
    max_new_tokens: int = _trl_default("max_new_tokens", 512, "rollout length limit (TRL: max_completion_length)")
    seed: int = _trl_default("seed", 42, "random seed")
    lora_r: int = _trl_default("lora_r", 0, "LoRA rank (0: full fine-tune)")
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
    entropy_coef: float = option(0.0, "TRL's entropy bonus: loss - entropy_coef * mean token entropy, after the "
                                      "loss type's normalization (>= 0; positive rewards entropy)")
    skip_zero_advantage: bool = option(True, "leave zero-advantage rollouts out of the op when their loss is 0")
    output_dir: str = "runs/grpo"

    def validate(self):
        if self.max_completion_length is not None:
            self.max_new_tokens = self.max_completion_length
        super().validate()
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

"""Supervised fine-tuning on the task's reference solutions: the plain-SFT baseline of the comparisons.

Each training problem becomes the student context (the problem, as at evaluation) followed by its reference
worked solution and EOS; the loss is the fused NLL of the solution tokens only, on hidden states. No rollouts
and no teacher: ``generated_token_budget`` does not apply (use ``max_steps`` or ``time_budget_s``).
"""
from .config import SFTConfig
from .trainer import SFTTrainer

__all__ = ["SFTConfig", "SFTTrainer"]

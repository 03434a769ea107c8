"""GRPO baseline (TRL semantics): G rollouts per prompt, verifier rewards, group advantages, clipped surrogate.

The rewards of each prompt's G completions become advantages A = (r - mean) / (std + 1e-4) (``scale_rewards``
"group"; "batch" uses the whole batch's std, "none" does not divide); the loss is the fused clipped surrogate
of :func:`pydistill.losses.grpo_loss` on the policy's hidden states, with an optional k3 KL to a reference
model (the initial weights: the LoRA adapter disabled, or a frozen copy) when ``beta`` > 0. Rollouts of
zero-spread groups have advantage 0: with ``beta`` = 0 and no entropy bonus their loss is exactly 0, so their
tokens are left out of the op (no FLOPs) while still counting in the normalization.
"""
from .config import GRPOLoopConfig
from .trainer import GRPOLoopTrainer

__all__ = ["GRPOLoopConfig", "GRPOLoopTrainer"]

RENAMED = {"GRPOConfig": "GRPOLoopConfig", "GRPOTrainer": "GRPOLoopTrainer"}  # so as not to share TRL's names


def __getattr__(name):
    from ..._deprecated import renamed

    return renamed(__name__, name, RENAMED, globals())

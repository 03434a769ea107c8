"""Drop-in fused losses: hidden states and the lm_head weight in, loss and per-token metrics out.

Every loss takes [B, T, H] hidden states at the completion positions with a [B, T] mask and never builds the
[B, T, V] logits: one call of :func:`pydistill.token_stats` computes what it needs.
"""
from .advantages import GroupAdvantages, group_advantages
from .blend import BlendedLoss, blended_loss
from .distillation import DistillationLoss, distillation_loss, sampled_token_distillation_loss
from .masks import first_error_mask
from .nll import NLLLoss, nll_loss
from .output import LossOutput
from ..boundary import PackedRows, pack_rows, unpack_rows
from .policy_gradient import LOSS_TYPES, GRPOLoss, grpo_loss
from .reductions import REDUCTIONS

__all__ = ["BlendedLoss", "DistillationLoss", "GRPOLoss", "GroupAdvantages", "LOSS_TYPES", "LossOutput", "NLLLoss",
           "PackedRows", "REDUCTIONS", "blended_loss", "distillation_loss", "first_error_mask", "group_advantages",
           "grpo_loss", "nll_loss", "pack_rows", "sampled_token_distillation_loss", "unpack_rows"]

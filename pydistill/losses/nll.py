"""Supervised negative log-likelihood on hidden states (SFT warm-up, auxiliary SFT loss)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .output import LossOutput, masked_mean
from .reductions import check_num_items, reduce_tokens
from ..boundary import op_options, sequence_token_stats
from ..token_stats.loop import DEFAULT_MEMORY_BUDGET_MB
from .validation import check_per_token, check_sequence_layout


def nll_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: Optional[torch.Tensor] = None,
             *, token_weights: Optional[torch.Tensor] = None, reduction: str = "token_mean",
             num_items_in_batch: Optional[float] = None, temperature: float = 1.0, softcap: Optional[float] = None,
             bias: Optional[torch.Tensor] = None, impl: str = "auto",
             memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB) -> LossOutput:
    """Cross-entropy of ``targets`` [B, T] (the next tokens) under the model, from hidden states [B, T, H].

    Only the masked tokens (e.g. the answer, not the prompt) are scored, and only they reach the op.
    ``token_weights`` [B, T] or [B] multiply each token's -logp inside the mask. ``memory_budget_mb``: the
    op's speed/memory knob (:func:`pydistill.token_stats`).
    """
    b, t, mask = check_sequence_layout(hidden, mask)
    check_num_items(num_items_in_batch)
    token_weights = check_per_token("token_weights", token_weights, b, t, allow_sequence=True)
    logp, entropy, _ = sequence_token_stats(hidden, weight, mask, targets=targets,
                                            **op_options(bias=bias, temperature=temperature, softcap=softcap,
                                                         impl=impl, memory_budget_mb=memory_budget_mb,
                                                         differentiated=("logp",)))
    per_token = -logp if token_weights is None else -logp * token_weights.to(logp)
    loss = reduce_tokens(per_token, mask, reduction, num_items_in_batch)
    return LossOutput(loss, dict(nll=masked_mean(-logp.detach(), mask), entropy=masked_mean(entropy.detach(), mask),
                                 tokens=int(mask.sum())), dict(logp=logp.detach()))


class NLLLoss(nn.Module):
    """:func:`nll_loss` with its reduction fixed at construction."""

    def __init__(self, reduction: str = "token_mean", impl: str = "auto",
                 memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB):
        super().__init__()
        self.options = dict(reduction=reduction, impl=impl, memory_budget_mb=memory_budget_mb)

    def forward(self, hidden, weight, targets, mask=None, **kwargs) -> LossOutput:
        return nll_loss(hidden, weight, targets, mask, **{**self.options, **kwargs})

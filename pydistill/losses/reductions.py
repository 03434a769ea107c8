"""How per-token losses become one scalar.

- ``"token_mean"``: sum of masked per-token values / number of masked tokens; with gradient accumulation pass
  ``num_items_in_batch`` (the token count of the whole global batch, as TRL and transformers do), so that
  micro-batches of different sizes weigh each token equally.
- ``"sequence_mean"``: per-sequence mean over its masked tokens, then the mean over sequences that have any.
- ``"sum"``: the plain masked sum.
An empty mask gives exactly 0 (connected to the graph, so the backward yields zero gradients).
"""
from __future__ import annotations

from typing import Optional

import torch

REDUCTIONS = ("token_mean", "sequence_mean", "sum")


def reduce_tokens(per_token: torch.Tensor, mask: torch.Tensor, reduction: str,
                  num_items_in_batch: Optional[float] = None) -> torch.Tensor:
    """Reduce a [B, T] per-token loss under a [B, T] bool mask."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    masked = torch.where(mask, per_token, torch.zeros_like(per_token))
    if reduction == "sum":
        return masked.sum()
    if reduction == "token_mean":
        count = float(num_items_in_batch) if num_items_in_batch is not None else mask.sum().clamp_min(1)
        return masked.sum() / count
    lengths = mask.sum(dim=1)
    has_tokens = lengths > 0
    per_sequence = masked.sum(dim=1) / lengths.clamp_min(1)
    return per_sequence.sum() / has_tokens.sum().clamp_min(1)


def check_num_items(num_items_in_batch):
    """A number or a one-element tensor (transformers passes one), > 0; not a bool or text."""
    if num_items_in_batch is not None:
        try:
            value = float("nan") if isinstance(num_items_in_batch, (bool, str)) else float(num_items_in_batch)
        except (TypeError, ValueError, RuntimeError):
            value = float("nan")
        if not value > 0:
            raise ValueError(f"num_items_in_batch must be a number > 0 (the global batch's token count), got "
                             f"{num_items_in_batch!r}")

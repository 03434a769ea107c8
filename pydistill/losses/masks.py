"""Token masks: ROSD's first-error suffix."""
from __future__ import annotations

from typing import Optional

import torch


def first_error_mask(first_error: torch.Tensor, completion_mask: Optional[torch.Tensor] = None, *,
                     lengths: Optional[torch.Tensor] = None, max_length: Optional[int] = None) -> torch.Tensor:
    """[B, T] bool mask of the tokens at or after each sequence's first error t* (the suffix ROSD distills).

    ``first_error`` [B] holds t*, an index into the completion tokens; a negative t* (no error located, or a
    correct rollout) distills the whole completion. Give the completion's extent as ``completion_mask`` [B, T]
    or as ``lengths`` [B] with ``max_length`` T. Built with one broadcast comparison, no loop over tokens.
    """
    if not isinstance(first_error, torch.Tensor) or first_error.dim() != 1:
        raise ValueError("first_error must be a 1-D tensor [B] of token indices")
    b = first_error.shape[0]
    if completion_mask is not None:
        if completion_mask.dim() != 2 or completion_mask.shape[0] != b:
            raise ValueError(f"completion_mask must be [B, T] with B={b}, got {tuple(completion_mask.shape)}")
        t = completion_mask.shape[1]
        extent = completion_mask != 0
    elif lengths is not None and max_length is not None:
        if lengths.shape != (b,):
            raise ValueError(f"lengths must be [B]=[{b}], got {tuple(lengths.shape)}")
        t = int(max_length)
        extent = torch.arange(t, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
    else:
        raise ValueError("give completion_mask [B, T], or lengths [B] with max_length")
    start = first_error.to(extent.device).clamp_min(0).unsqueeze(1)
    return extent & (torch.arange(t, device=extent.device).unsqueeze(0) >= start)

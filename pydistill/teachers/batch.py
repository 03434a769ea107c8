"""Per-sequence top-k teachers as the [B, T, k] batch tensors that ``distillation_loss`` takes."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .server import PADDING_ID


def stack_topk(pairs: Sequence, length: Optional[int] = None, device=None):
    """Per-sequence ``(ids [T_b, k], logprobs [T_b, k], ...)`` (the teachers' outputs, or cache entries) as
    ``(ids [B, T, k] int64, logprobs [B, T, k] float32)``, right-padded with id -1 / log-prob -inf.

    Token t of sequence b sits at [b, t], the layout of ``build_context_batch``'s completions, so the result
    lines up with its ``targets`` and ``completion_mask``. ``T`` is ``length`` (at least the longest sequence)
    or the longest sequence."""
    if not pairs:
        raise ValueError("stack_topk needs at least one sequence")
    ks = {int(p[0].shape[1]) for p in pairs}
    if len(ks) != 1 or any(p[0].shape != p[1].shape or p[0].dim() != 2 for p in pairs):
        raise ValueError(f"every sequence's ids and logprobs must be [T, k] with one k, got shapes "
                         f"{sorted({(tuple(p[0].shape), tuple(p[1].shape)) for p in pairs})}")
    longest = max(int(p[0].shape[0]) for p in pairs)
    t = longest if length is None else length
    if t < longest:
        raise ValueError(f"length {length} is shorter than the longest sequence ({longest} tokens)")
    k = ks.pop()
    ids = torch.full((len(pairs), t, k), PADDING_ID, dtype=torch.int64)
    logprobs = torch.full((len(pairs), t, k), -math.inf, dtype=torch.float32)
    for b, (row_ids, row_lp, *_) in enumerate(pairs):
        ids[b, :row_ids.shape[0]] = row_ids
        logprobs[b, :row_lp.shape[0]] = row_lp
    return (ids, logprobs) if device is None else (ids.to(device), logprobs.to(device))

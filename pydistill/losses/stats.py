"""One call of the core op over the [B, T, H] trainer layout, returning [B, T] statistics."""
from __future__ import annotations

from typing import Optional

import torch

from ..token_stats import token_stats
from ..token_stats.loop import DEFAULT_MEMORY_BUDGET_MB
from .validation import check_per_token, check_vocab_weight


def sequence_token_stats(hidden, weight, mask, *, targets=None, teacher_hidden=None, teacher_topk_ids=None,
                         teacher_topk_logprobs=None, **op_options):
    """(logp, entropy, divergence) as [B, T] float32, zeros outside ``mask``.

    The [B, T, H] hidden states are flattened (a view) and the op gathers the masked rows out itself, so
    tokens outside the mask cost no FLOPs in forward or backward. A top-k teacher comes as [B, T, k] ids and
    log-probs; positions outside the mask may hold anything (they become padding entries).
    """
    b, t, width = hidden.shape
    check_vocab_weight(weight)
    flat_targets = None
    if targets is not None:
        targets = check_per_token("targets", targets, b, t)
        flat_targets = targets.reshape(-1).to(device=hidden.device, dtype=torch.long)
        # padding positions may hold any id: make them ignore_index so that they are never range-checked
        flat_targets = torch.where(mask.reshape(-1), flat_targets, torch.full_like(flat_targets, -100))
    flat_teacher = None
    if teacher_hidden is not None:
        if teacher_hidden.dim() != 3 or tuple(teacher_hidden.shape[:2]) != (b, t):
            raise ValueError(f"teacher_hidden must be [B, T, H_t] with B, T = {b}, {t} (aligned with the student's "
                             f"response positions), got {tuple(teacher_hidden.shape)}")
        flat_teacher = teacher_hidden.reshape(b * t, -1)
    topk = {}
    if teacher_topk_ids is not None or teacher_topk_logprobs is not None:
        topk = _flat_topk(teacher_topk_ids, teacher_topk_logprobs, mask, b, t)
    stats = token_stats(hidden.reshape(b * t, width), weight, targets=flat_targets, teacher_hidden=flat_teacher,
                        mask=mask.reshape(-1), **topk, **op_options)
    return tuple(s.reshape(b, t) for s in stats)


def _flat_topk(ids, logprobs, mask, b, t) -> dict:
    """[B, T, k] top-k teacher tensors as the op's [B*T, k] arguments, padding outside ``mask``."""
    for name, x in (("teacher_topk_ids", ids), ("teacher_topk_logprobs", logprobs)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or tuple(x.shape[:2]) != (b, t):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be [B, T, k] with B, T = {b}, {t} (aligned with the response "
                             f"positions), got {shape}")
    outside = ~mask.reshape(-1, 1).to(ids.device)
    flat_ids = ids.reshape(b * t, -1).masked_fill(outside, -1)
    logprobs = logprobs.reshape(b * t, -1)
    if logprobs.is_floating_point():  # else the op names the dtype
        logprobs = logprobs.masked_fill(outside, float("-inf"))
    return dict(teacher_topk_ids=flat_ids, teacher_topk_logprobs=logprobs)


def op_options(*, bias=None, teacher_weight=None, teacher_bias=None, temperature=1.0, softcap=None, impl="auto",
               divergence: Optional[str] = None, beta: float = 0.5, clip: Optional[float] = None,
               topk_tail: bool = True, support_topk: Optional[int] = None,
               memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB, differentiated=None) -> dict:
    """The op's options of a loss; ``differentiated`` names the outputs the loss differentiates (the fast
    mode keeps one gradient basis per name, so naming only those keeps the budget for rows)."""
    return dict(bias=bias, teacher_weight=teacher_weight, teacher_bias=teacher_bias, temperature=temperature,
                softcap=softcap, impl=impl, divergence=divergence, beta=beta, clip=clip, topk_tail=topk_tail,
                support_topk=support_topk, memory_budget_mb=memory_budget_mb, differentiated=differentiated)

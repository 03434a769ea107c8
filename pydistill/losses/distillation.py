"""Distillation losses between a teacher and a student context (OPSD, ROSD, Feedback Distillation)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .output import LossOutput, masked_mean
from .reductions import check_num_items, reduce_tokens
from ..boundary import op_options, sequence_token_stats
from ..token_stats.loop import DEFAULT_MEMORY_BUDGET_MB
from .validation import check_nonnegative, check_per_token, check_positive, check_sequence_layout, check_unit


def distillation_per_token(divergence: torch.Tensor, logp: Optional[torch.Tensor], *, old_logp=None,
                           importance_clip: Optional[float] = None, token_weights=None):
    """Per-token distillation loss [B, T] and the detached importance weight (ones when unused).

    loss_t = w_t * iw_t * D_t, with iw_t = min(exp(logp_t - old_logp_t), importance_clip), detached (ROSD's
    is_clip): it re-weights tokens sampled by an older policy without passing gradient through the ratio.
    """
    weight = torch.ones_like(divergence)
    if importance_clip is not None:
        reference = logp.detach() if old_logp is None else old_logp.to(logp)
        weight = torch.exp(logp.detach() - reference).clamp(max=importance_clip)
    per_token = weight * divergence
    if token_weights is not None:
        per_token = per_token * token_weights.to(per_token)
    return per_token, weight


def distillation_term(divergence: torch.Tensor, logp: Optional[torch.Tensor], entropy: torch.Tensor,
                      mask: torch.Tensor, *, old_logp=None, importance_clip: Optional[float] = None,
                      token_weights=None, entropy_coef: float = 0.0, reduction: str = "token_mean",
                      num_items_in_batch: Optional[float] = None):
    """(loss, importance weight) of the distillation from [B, T] statistics of the op: the weighted per-token
    divergence reduced by ``reduction``, then ``- entropy_coef * H`` with H the mean entropy over the masked
    tokens (TRL's entropy bonus: over ``num_items_in_batch`` with ``"token_mean"``, as the divergence).
    :func:`distillation_loss` and :func:`pydistill.losses.blended_loss` both are this term over one op call."""
    per_token, iw = distillation_per_token(divergence, logp, old_logp=old_logp, importance_clip=importance_clip,
                                           token_weights=token_weights)
    loss = reduce_tokens(per_token, mask, reduction, num_items_in_batch)
    if entropy_coef:
        count = num_items_in_batch if reduction == "token_mean" else None
        loss = loss - entropy_coef * reduce_tokens(entropy, mask, "token_mean", count)
    return loss, iw


def distillation_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor],
    mask: Optional[torch.Tensor] = None,
    *,
    teacher_weight: Optional[torch.Tensor] = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    clip: Optional[float] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    teacher_temperature: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    teacher_topk_ids: Optional[torch.Tensor] = None,
    teacher_topk_logprobs: Optional[torch.Tensor] = None,
    topk_tail: bool = True,
    support_topk: Optional[int] = None,
    token_weights: Optional[torch.Tensor] = None,
    targets: Optional[torch.Tensor] = None,
    old_logp: Optional[torch.Tensor] = None,
    importance_clip: Optional[float] = None,
    entropy_coef: float = 0.0,
    reduction: str = "token_mean",
    num_items_in_batch: Optional[float] = None,
    impl: str = "auto",
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
) -> LossOutput:
    """Full-vocabulary teacher-student divergence on the response tokens, from hidden states.

    Both contexts score the same response tokens: row (b, t) of ``hidden`` (student context) and of
    ``teacher_hidden`` (teacher context, e.g. with privileged information) sit on the same sampled token.

    Args:
        hidden: student hidden states [B, T, H] at the response positions (requires grad).
        weight: the lm_head weight [V, H].
        teacher_hidden: [B, T, H_t], no gradient. ``teacher_weight`` [V, H_t] defaults to ``weight``
            (self-distillation); pass it for a separate teacher head.
        mask: [B, T], nonzero on tokens to distill (e.g. a first-error suffix mask). Tokens outside it are
            gathered out before the op and cost nothing.
        divergence: ``"forward_kl"`` KL(p_teacher || q_student), ``"reverse_kl"`` KL(q || p), or ``"jsd"``
            with ``beta``: beta KL(p || M) + (1 - beta) KL(q || M), M = beta p + (1 - beta) q. ``beta=0`` is
            exactly forward KL and ``beta=1`` exactly reverse KL (TRL GKD / Liger convention).
        teacher_topk_ids, teacher_topk_logprobs, topk_tail: a teacher given as its top-k log-probs ([B, T, k]
            ids and log-probs, e.g. from a vLLM server or a cache) instead of ``teacher_hidden`` (pass None):
            the divergence is over the k tokens plus a tail bucket, or over the k renormalized (``topk_tail=False``);
            see :func:`pydistill.token_stats`. Positions outside ``mask`` may hold anything.
        support_topk: k: with ``teacher_hidden``, the divergence over the student's own k most likely tokens (plus
            a tail bucket with ``topk_tail``), the teacher's log-probs at those ids (ROSD's original top-100 + tail).
        clip: OPSD's pointwise clip tau > 0 on each vocabulary entry's term, before the sum.
        temperature, softcap, teacher_temperature, teacher_softcap, bias, teacher_bias: as in
            :func:`pydistill.token_stats` (a separate teacher head's cap: ``teacher_softcap``, 0 for none).
        token_weights: [B, T] (or [B]) multiplicative weights applied inside the mask: the loss of token t is
            ``token_weights[t] * iw[t] * D[t]`` and the mask decides which tokens count at all.
        targets, old_logp, importance_clip: with ``importance_clip`` set, the sampled token ids ``targets``
            [B, T] give logp_t and each token is weighted by the detached ``min(exp(logp_t - old_logp_t),
            importance_clip)``; without ``old_logp`` (on-policy) that weight is 1.
        entropy_coef: TRL's meaning (``GRPOConfig.entropy_coef``): ``loss = L_distill - entropy_coef * H``, H the
            mean entropy (nats) over the masked tokens, subtracted after ``reduction`` (over
            ``num_items_in_batch`` with ``"token_mean"``). >= 0: a positive value rewards entropy; 0 off.
        reduction: ``"token_mean"`` (default; divides by ``num_items_in_batch`` when given, for gradient
            accumulation), ``"sequence_mean"`` or ``"sum"``.
        impl: the core op's backend.
        memory_budget_mb: the op's speed/memory knob (:func:`pydistill.token_stats`): with room for one
            gradient basis row per token (N x V, bfloat16 on CUDA) the gradient is formed in the forward.

    Returns:
        :class:`LossOutput` with ``metrics`` divergence, entropy, importance_weight (means over the mask) and
        tokens, and ``per_token`` divergence / entropy [B, T].
    """
    b, t, mask = check_sequence_layout(hidden, mask)
    check_positive("clip (tau)", clip)
    check_positive("importance_clip", importance_clip)
    check_unit("beta", beta)
    check_nonnegative("entropy_coef", entropy_coef, optional=False)
    check_num_items(num_items_in_batch)
    if importance_clip is not None and targets is None:
        raise ValueError("targets [B, T] (the sampled token ids) are required with importance_clip")
    token_weights = check_per_token("token_weights", token_weights, b, t, allow_sequence=True)
    old_logp = check_per_token("old_logp", old_logp, b, t)
    logp, entropy, div = sequence_token_stats(
        hidden, weight, mask, targets=targets, teacher_hidden=teacher_hidden,
        teacher_topk_ids=teacher_topk_ids, teacher_topk_logprobs=teacher_topk_logprobs,
        **op_options(bias=bias, teacher_weight=teacher_weight, teacher_bias=teacher_bias, temperature=temperature,
                     softcap=softcap, teacher_temperature=teacher_temperature, teacher_softcap=teacher_softcap,
                     impl=impl, divergence=divergence,
                     beta=beta, clip=clip, topk_tail=topk_tail,
                     support_topk=support_topk, memory_budget_mb=memory_budget_mb,
                     differentiated=("entropy", "divergence") if entropy_coef else ("divergence",)))
    loss, iw = distillation_term(div, logp if targets is not None else None, entropy, mask, old_logp=old_logp,
                                 importance_clip=importance_clip, token_weights=token_weights,
                                 entropy_coef=entropy_coef, reduction=reduction, num_items_in_batch=num_items_in_batch)
    metrics = dict(divergence=masked_mean(div.detach(), mask), entropy=masked_mean(entropy.detach(), mask),
                   importance_weight=masked_mean(iw, mask), tokens=int(mask.sum()))
    return LossOutput(loss, metrics, dict(divergence=div.detach(), entropy=entropy.detach()))


def sampled_token_distillation_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    teacher_logp: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    token_weights: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    bias: Optional[torch.Tensor] = None,
    reduction: str = "token_mean",
    num_items_in_batch: Optional[float] = None,
    impl: str = "auto",
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
) -> LossOutput:
    """OPSD's sampled-token variant: a policy gradient whose per-token advantage is the teacher's log-ratio.

    A_t = stopgrad(logp_teacher(y_t) - logp_student(y_t)); loss_t = -A_t * logp_student(y_t). Only the
    teacher's log-probability of the sampled tokens is needed (``teacher_logp`` [B, T], e.g. from
    ``token_stats(teacher_hidden, teacher_weight, targets=...)`` under no_grad), so the teacher may be a
    different, larger model with its own vocabulary head.
    """
    b, t, mask = check_sequence_layout(hidden, mask)
    check_num_items(num_items_in_batch)
    teacher_logp = check_per_token("teacher_logp", teacher_logp, b, t)
    token_weights = check_per_token("token_weights", token_weights, b, t, allow_sequence=True)
    logp, entropy, _ = sequence_token_stats(hidden, weight, mask, targets=targets,
                                            **op_options(bias=bias, temperature=temperature, softcap=softcap,
                                                         impl=impl, memory_budget_mb=memory_budget_mb,
                                                         differentiated=("logp",)))
    advantage = torch.where(mask, teacher_logp.to(logp) - logp.detach(), torch.zeros_like(logp))
    per_token = -advantage * logp
    if token_weights is not None:
        per_token = per_token * token_weights.to(per_token)
    loss = reduce_tokens(per_token, mask, reduction, num_items_in_batch)
    metrics = dict(advantage=masked_mean(advantage, mask), logp=masked_mean(logp.detach(), mask),
                   entropy=masked_mean(entropy.detach(), mask), tokens=int(mask.sum()))
    return LossOutput(loss, metrics, dict(advantage=advantage, logp=logp.detach()))


class DistillationLoss(nn.Module):
    """:func:`distillation_loss` with its options fixed at construction."""

    def __init__(self, divergence: str = "forward_kl", beta: float = 0.5, clip: Optional[float] = None,
                 temperature: float = 1.0, importance_clip: Optional[float] = None, entropy_coef: float = 0.0,
                 reduction: str = "token_mean", impl: str = "auto",
                 memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB):
        super().__init__()
        self.options = dict(divergence=divergence, beta=beta, clip=clip, temperature=temperature,
                            importance_clip=importance_clip, entropy_coef=entropy_coef, reduction=reduction,
                            impl=impl, memory_budget_mb=memory_budget_mb)

    def forward(self, hidden, weight, teacher_hidden, mask=None, **kwargs) -> LossOutput:
        return distillation_loss(hidden, weight, teacher_hidden, mask, **{**self.options, **kwargs})

"""GRPO-family policy-gradient loss on hidden states (TRL semantics)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .output import LossOutput, masked_mean
from .reductions import check_num_items, reduce_tokens
from ..boundary import op_options, sequence_token_stats
from ..token_stats.loop import DEFAULT_MEMORY_BUDGET_MB
from .validation import check_nonnegative, check_per_token, check_positive, check_sequence_layout

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_LEVELS = ("token", "sequence")


def policy_gradient_per_token(logp, advantages, mask, *, old_logp=None, ref_logp=None, beta=0.0, epsilon_low=0.2,
                              epsilon_high=None, delta=None, importance_sampling_level="token"):
    """Per-token clipped-surrogate loss [B, T] and the detached statistics behind it.

    ratio w = exp(logp - old_logp) per token, or for ``"sequence"`` level (GSPO) exp of the masked mean of the
    log-ratio over each sequence; L = -min(w A, clip(w, 1 - eps_low, 1 + eps_high) A), with w first capped at
    ``delta`` when given (two-sided clipping); plus ``beta`` times the k3 estimate of KL(pi || ref)
    exp(ref - logp) - (ref - logp) - 1. No entropy term: that is applied after the reduction
    (:func:`policy_gradient_term`).
    """
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    old = logp.detach() if old_logp is None else old_logp.to(logp)
    log_ratio = torch.where(mask, logp - old, torch.zeros_like(logp))
    if importance_sampling_level == "sequence":
        lengths = mask.sum(dim=1, keepdim=True).clamp_min(1)
        log_ratio = (log_ratio.sum(dim=1, keepdim=True) / lengths).expand_as(logp)
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1.0 - epsilon_low, 1.0 + eps_high)
    if delta is not None:
        ratio = ratio.clamp(max=delta)
    per_token = -torch.minimum(ratio * advantages, clipped * advantages)
    kl = None
    if beta:
        gap = torch.where(mask, ref_logp.to(logp) - logp, torch.zeros_like(logp))
        kl = torch.exp(gap) - gap - 1.0
        per_token = per_token + beta * kl
    with torch.no_grad():
        low = (ratio < 1.0 - epsilon_low) & (advantages < 0) & mask
        high = (ratio > 1.0 + eps_high) & (advantages > 0) & mask
    stats = dict(ratio=ratio.detach(), clipped_low=low, clipped_high=high, kl=None if kl is None else kl.detach())
    return per_token, stats


def policy_gradient_term(logp, entropy, advantages, mask, *, loss_type: str, old_logp=None, ref_logp=None,
                         beta: float = 0.0, epsilon_low: float = 0.2, epsilon_high: Optional[float] = None,
                         delta: Optional[float] = None, importance_sampling_level: str = "token",
                         max_completion_length: Optional[int] = None, num_items_in_batch: Optional[float] = None,
                         entropy_coef: float = 0.0):
    """(loss, metrics) of the policy gradient from [B, T] statistics of the op: the per-token clipped surrogate
    (+ KL), the loss type's reduction, then ``- entropy_coef * H`` (TRL's bonus, :func:`entropy_bonus`).
    :func:`grpo_loss` and :func:`pydistill.losses.blended_loss` both are this term over one op call."""
    per_token, stats = policy_gradient_per_token(
        logp, advantages.to(logp), mask, old_logp=old_logp, ref_logp=ref_logp, beta=beta, epsilon_low=epsilon_low,
        epsilon_high=epsilon_high, delta=delta, importance_sampling_level=importance_sampling_level)
    loss = reduce_policy_loss(per_token, mask, loss_type, max_completion_length=max_completion_length,
                              num_items_in_batch=num_items_in_batch)
    if entropy_coef:
        loss = loss - entropy_coef * entropy_bonus(entropy, mask, loss_type, num_items_in_batch=num_items_in_batch)
    return loss, policy_metrics(stats, logp, entropy, mask)


def check_policy_inputs(advantages, old_logp, ref_logp, b: int, t: int, kl_coef: float, kl_name: str = "beta"):
    """The per-token inputs of the policy term as [B, T] (advantages may be per sequence [B]); ``ref_logp`` is
    required when the KL coefficient (named ``kl_name`` in the caller's signature) is > 0."""
    advantages = check_per_token("advantages", advantages, b, t, allow_sequence=True)
    old_logp = check_per_token("old_logp", old_logp, b, t)
    if kl_coef and ref_logp is None:
        raise ValueError(f"ref_logp [B, T] is required when {kl_name} > 0")
    return advantages, old_logp, check_per_token("ref_logp", ref_logp, b, t)


def reduce_policy_loss(per_token, mask, loss_type: str, *, max_completion_length: Optional[int] = None,
                       num_items_in_batch: Optional[float] = None):
    """TRL's normalizations: grpo = per-sequence mean then batch mean; bnpo and dapo = token sum / token
    count (``num_items_in_batch``, the global count, when given); dr_grpo = token sum / (B * max length)."""
    masked = torch.where(mask, per_token, torch.zeros_like(per_token))
    if loss_type == "grpo":
        return (masked.sum(dim=1) / mask.sum(dim=1).clamp_min(1)).mean()
    if loss_type in ("bnpo", "dapo"):
        count = float(num_items_in_batch) if num_items_in_batch is not None else mask.sum().clamp_min(1)
        return masked.sum() / count
    length = max_completion_length if max_completion_length is not None else mask.shape[1]
    return masked.sum() / (mask.shape[0] * length)


def entropy_bonus(entropy, mask, loss_type: str, *, num_items_in_batch: Optional[float] = None):
    """TRL's entropy bonus H: the mean entropy over the masked tokens, whatever the loss type (TRL 1.16 subtracts
    ``entropy_coef * H`` after reducing the policy term, L = L_policy - coef * H, so the bonus is not rescaled by
    grpo's per-sequence or dr_grpo's B * max-length normalization).

    Under gradient accumulation TRL divides each micro-batch's token mean by the accumulation steps. Here the
    count follows the loss type's own: for the token-normalized types (bnpo, dapo) ``num_items_in_batch`` when
    given, so the micro-batch bonuses sum to the global token mean (TRL's value when micro-batches hold equal
    token counts); for grpo and dr_grpo, whose micro-batch losses the caller rescales by its share of the batch,
    this call's own tokens.
    """
    token_normalized = loss_type in ("bnpo", "dapo")
    return reduce_tokens(entropy, mask, "token_mean", num_items_in_batch if token_normalized else None)


def check_policy_options(loss_type, importance_sampling_level, epsilon_low, epsilon_high, delta, beta,
                         max_completion_length, num_items_in_batch):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_LEVELS}, "
                         f"got {importance_sampling_level!r}")
    check_nonnegative("epsilon_low", epsilon_low, optional=False)
    check_nonnegative("epsilon_high", epsilon_high)  # None: epsilon_low's value
    check_nonnegative("beta", beta, optional=False)
    if epsilon_low >= 1:
        raise ValueError(f"epsilon_low must be < 1 (the ratio's lower clip is 1 - epsilon_low), got {epsilon_low}")
    if delta is not None:
        check_positive("delta", delta)
        if delta <= 1.0:
            raise ValueError(f"delta must be > 1 (it caps the ratio from above), got {delta}")
    if max_completion_length is not None and (not isinstance(max_completion_length, int)
                                              or isinstance(max_completion_length, bool) or max_completion_length < 1):
        raise ValueError(f"max_completion_length must be a positive int, got {max_completion_length!r}")
    check_num_items(num_items_in_batch)


def grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    old_logp: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: Optional[float] = None,
    delta: Optional[float] = None,
    importance_sampling_level: str = "token",
    loss_type: str = "dapo",
    max_completion_length: Optional[int] = None,
    num_items_in_batch: Optional[float] = None,
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    bias: Optional[torch.Tensor] = None,
    impl: str = "auto",
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
) -> LossOutput:
    """GRPO / BNPO / Dr. GRPO / DAPO clipped-surrogate loss from hidden states, never from logits.

    Args:
        hidden: policy hidden states [B, T, H] at the completion positions; ``weight`` the lm_head [V, H].
        targets: sampled completion token ids [B, T].
        advantages: per sequence [B] (broadcast to its tokens), per token [B, T] or flat [B*T], e.g. from
            :func:`group_advantages`.
        mask: completion mask [B, T]; masked tokens cost nothing.
        old_logp: [B, T] log-probs of the sampling policy; None means on-policy (ratio 1, gradient of logp A).
        ref_logp, beta: k3 KL penalty beta * (exp(ref - logp) - (ref - logp) - 1) per token (``ref_logp``
            required when beta > 0).
        epsilon_low, epsilon_high: the ratio's clip range [1 - eps_low, 1 + eps_high] (eps_high defaults to
            eps_low); ``delta`` (> 1) caps the unclipped ratio too (two-sided clipping).
        importance_sampling_level: ``"token"`` (GRPO) or ``"sequence"`` (GSPO: the ratio of each sequence is
            exp of its mean token log-ratio).
        loss_type: normalization, as TRL: ``"grpo"`` mean over each sequence's tokens then over sequences;
            ``"dapo"`` token sum / token count (``num_items_in_batch`` overrides the count: pass the global count
            under gradient accumulation); ``"bnpo"`` the same here, which differs from TRL 1.16 under gradient
            accumulation: TRL's bnpo ignores ``num_items_in_batch`` and divides each micro-batch's token mean by
            the accumulation steps (for TRL's exactly, leave ``num_items_in_batch`` unset and divide the loss by
            the steps yourself, or use :mod:`pydistill.integrations.trl`); ``"dr_grpo"`` token sum / (B *
            ``max_completion_length``, default T).
        entropy_coef: TRL's meaning (``GRPOConfig.entropy_coef``): ``loss = L_policy - entropy_coef * H``, H the
            mean entropy (nats) over the masked tokens, subtracted after the loss type's normalization and never
            rescaled by it (:func:`entropy_bonus`). >= 0: a positive value rewards entropy (exploration); 0 off.
        memory_budget_mb: the op's speed/memory knob (:func:`pydistill.token_stats`).

    Returns:
        :class:`LossOutput`; metrics: clip_ratio_low / clip_ratio_high / clip_ratio (share of masked tokens),
        ratio_mean, kl (when beta > 0), entropy, logp, tokens.
    """
    b, t, mask = check_sequence_layout(hidden, mask)
    check_policy_options(loss_type, importance_sampling_level, epsilon_low, epsilon_high, delta, beta,
                         max_completion_length, num_items_in_batch)
    check_nonnegative("entropy_coef", entropy_coef, optional=False)
    advantages, old_logp, ref_logp = check_policy_inputs(advantages, old_logp, ref_logp, b, t, beta)
    logp, entropy, _ = sequence_token_stats(hidden, weight, mask, targets=targets,
                                            **op_options(bias=bias, temperature=temperature, softcap=softcap,
                                                         impl=impl, memory_budget_mb=memory_budget_mb,
                                                         differentiated=("logp", "entropy") if entropy_coef
                                                         else ("logp",)))
    loss, metrics = policy_gradient_term(
        logp, entropy, advantages, mask, loss_type=loss_type, old_logp=old_logp, ref_logp=ref_logp, beta=beta,
        epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta,
        importance_sampling_level=importance_sampling_level, max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch, entropy_coef=entropy_coef)
    return LossOutput(loss, metrics, dict(logp=logp.detach(), entropy=entropy.detach()))


def policy_metrics(stats, logp, entropy, mask) -> dict:
    tokens = int(mask.sum())
    share = (lambda m: float(m.sum()) / tokens if tokens else 0.0)  # noqa: E731
    metrics = dict(clip_ratio_low=share(stats["clipped_low"]), clip_ratio_high=share(stats["clipped_high"]),
                   clip_ratio=share(stats["clipped_low"] | stats["clipped_high"]),
                   ratio_mean=masked_mean(stats["ratio"], mask), entropy=masked_mean(entropy.detach(), mask),
                   logp=masked_mean(logp.detach(), mask), tokens=tokens)
    if stats["kl"] is not None:
        metrics["kl"] = masked_mean(stats["kl"], mask)
    return metrics


class GRPOLoss(nn.Module):
    """:func:`grpo_loss` with its options fixed at construction."""

    def __init__(self, loss_type: str = "dapo", epsilon_low: float = 0.2, epsilon_high: Optional[float] = None,
                 delta: Optional[float] = None, beta: float = 0.0, importance_sampling_level: str = "token",
                 entropy_coef: float = 0.0, temperature: float = 1.0, max_completion_length: Optional[int] = None,
                 impl: str = "auto", memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB):
        super().__init__()
        check_policy_options(loss_type, importance_sampling_level, epsilon_low, epsilon_high, delta, beta,
                             max_completion_length, None)
        self.options = dict(loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta,
                            beta=beta, importance_sampling_level=importance_sampling_level,
                            entropy_coef=entropy_coef, temperature=temperature,
                            max_completion_length=max_completion_length, impl=impl,
                            memory_budget_mb=memory_budget_mb)

    def forward(self, hidden, weight, targets, advantages, mask=None, **kwargs) -> LossOutput:
        return grpo_loss(hidden, weight, targets, advantages, mask, **{**self.options, **kwargs})

"""Distillation blended with a policy gradient, both from one pass of the core op."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .distillation import distillation_term
from .output import LossOutput, masked_mean
from .policy_gradient import check_policy_inputs, check_policy_options, policy_gradient_term
from ..boundary import op_options, sequence_token_stats
from ..token_stats.loop import DEFAULT_MEMORY_BUDGET_MB
from .validation import check_positive, check_sequence_layout


def blended_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor],
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    distillation_weight: float = 0.5,
    teacher_weight: Optional[torch.Tensor] = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    clip: Optional[float] = None,
    old_logp: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    kl_beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: Optional[float] = None,
    delta: Optional[float] = None,
    importance_sampling_level: str = "token",
    loss_type: str = "dapo",
    max_completion_length: Optional[int] = None,
    num_items_in_batch: Optional[float] = None,
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
    impl: str = "auto",
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
) -> LossOutput:
    """``w * distillation + (1 - w) * policy gradient`` from a single call of the core op.

    The op returns the sampled tokens' logp, the entropy and the teacher-student divergence in one sweep, so
    the blend costs what either loss costs alone. The two parts are the same terms the two losses apply to
    their own op call: the distillation part is :func:`distillation_loss`'s token-mean (divided by
    ``num_items_in_batch`` when given), the policy part :func:`grpo_loss` with ``loss_type`` (its KL
    coefficient is ``kl_beta`` here, since ``beta`` is the JSD's). ``w`` = ``distillation_weight`` in [0, 1];
    its gradient is exactly the weighted sum of the two losses' gradients, and w = 0 / 1 give exactly
    :func:`grpo_loss` / :func:`distillation_loss`. No entropy bonus (it would be a third differentiated output).
    The teacher is ``teacher_hidden`` or, with ``teacher_hidden=None``, ``teacher_topk_ids`` /
    ``teacher_topk_logprobs`` [B, T, k] (see :func:`distillation_loss`).
    Two outputs carry gradient (logp and the divergence) with per-token weights not known in the forward, so
    the fast mode keeps two gradient bases: it needs twice the ``memory_budget_mb`` of either loss alone (at
    w = 0 or 1 one output, one basis).
    """
    b, t, mask = check_sequence_layout(hidden, mask)
    if not (isinstance(distillation_weight, (int, float)) and 0.0 <= distillation_weight <= 1.0):
        raise ValueError(f"distillation_weight must be in [0, 1], got {distillation_weight!r}")
    check_positive("clip (tau)", clip)
    check_policy_options(loss_type, importance_sampling_level, epsilon_low, epsilon_high, delta, kl_beta,
                         max_completion_length, num_items_in_batch)
    advantages, old_logp, ref_logp = check_policy_inputs(advantages, old_logp, ref_logp, b, t, kl_beta, "kl_beta")
    live = ("logp",) * (distillation_weight < 1) + ("divergence",) * (distillation_weight > 0)
    logp, entropy, div = sequence_token_stats(
        hidden, weight, mask, targets=targets, teacher_hidden=teacher_hidden,
        teacher_topk_ids=teacher_topk_ids, teacher_topk_logprobs=teacher_topk_logprobs,
        **op_options(bias=bias, teacher_weight=teacher_weight, teacher_bias=teacher_bias, temperature=temperature,
                     softcap=softcap, teacher_temperature=teacher_temperature, teacher_softcap=teacher_softcap,
                     impl=impl, divergence=divergence,
                     beta=beta, clip=clip, topk_tail=topk_tail,
                     support_topk=support_topk, memory_budget_mb=memory_budget_mb,
                     differentiated=live))
    distill, _ = distillation_term(div, logp, entropy, mask, num_items_in_batch=num_items_in_batch)
    policy, metrics = policy_gradient_term(
        logp, entropy, advantages, mask, loss_type=loss_type, old_logp=old_logp, ref_logp=ref_logp, beta=kl_beta,
        epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta,
        importance_sampling_level=importance_sampling_level, max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch)
    # A term of weight 0 is left out of the loss and of the differentiated outputs: one gradient basis instead
    # of two in the fast mode, and w = 0 / 1 are the two losses exactly (a basis pair rounds dW differently).
    if distillation_weight == 0:
        loss = policy
    elif distillation_weight == 1:
        loss = distill
    else:
        loss = distillation_weight * distill + (1.0 - distillation_weight) * policy
    metrics.update(divergence=masked_mean(div.detach(), mask), distillation_loss=float(distill.detach()),
                   policy_loss=float(policy.detach()))
    return LossOutput(loss, metrics, dict(logp=logp.detach(), entropy=entropy.detach(), divergence=div.detach()))


class BlendedLoss(nn.Module):
    """:func:`blended_loss` with its options fixed at construction."""

    def __init__(self, distillation_weight: float = 0.5, **options):
        super().__init__()
        self.options = dict(distillation_weight=distillation_weight, **options)

    def forward(self, hidden, weight, teacher_hidden, targets, advantages, mask=None, **kwargs) -> LossOutput:
        return blended_loss(hidden, weight, teacher_hidden, targets, advantages, mask, **{**self.options, **kwargs})
